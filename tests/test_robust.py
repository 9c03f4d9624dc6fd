"""robust.py, the pure maths of robust rounds: each statistic equals numpy's or scipy's over the
whole stacked matrix, bit for bit, however the coordinates are cut into slices; Krum chooses
what a plain reference implementation chooses."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
from hypothesis import given, settings
from hypothesis import strategies as st

from microfl import robust


def stacked(seed: int, n: int, d: int, f32: bool = True) -> np.ndarray:
    """Updates of mixed magnitudes as float64, as shards read them: float32 values (whose sums
    are often exact) or float64 ones (whose sums round, so the order of a sum shows)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)) * 10.0 ** rng.uniform(-3, 3, size=d)
    return x.astype(np.float32).astype(np.float64) if f32 else x


def by_slices(fn, x: np.ndarray, width: int) -> np.ndarray:  # type: ignore[no-untyped-def]
    return np.concatenate([fn(x[:, i : i + width]) for i in range(0, x.shape[1], width)])


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 40),
    d=st.integers(2, 30),
    width=st.integers(1, 30),
    beta=st.sampled_from([0.0, 0.05, 0.1, 0.2, 0.3, 0.45, 0.49]),
    seed=st.integers(0, 2**32 - 1),
    f32=st.booleans(),
)
def test_statistics_equal_numpy_and_scipy_bit_for_bit_in_any_slices(
    n: int, d: int, width: int, beta: float, seed: int, f32: bool
) -> None:
    x = stacked(seed, n, d, f32)
    assert by_slices(robust.median, x, width).tobytes() == np.median(x, axis=0).tobytes()
    want = scipy.stats.trim_mean(x, beta, axis=0)
    got = by_slices(lambda s: robust.trimmed_mean(s, beta), x, width)
    assert got.tobytes() == want.tobytes()


def test_ties_and_repeated_values_too() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(-3, 4, size=(25, 12)).astype(np.float64)
    for width in (1, 5, 12):
        assert by_slices(robust.median, x, width).tobytes() == np.median(x, axis=0).tobytes()
        got = by_slices(lambda s: robust.trimmed_mean(s, 0.2), x, width)
        assert got.tobytes() == scipy.stats.trim_mean(x, 0.2, axis=0).tobytes()


def test_mean_rows_sums_row_after_row_even_in_a_single_column() -> None:
    """np.mean of an (N, 1) matrix sums pairwise (other bits than the wide matrix's sum, row
    after row); mean_rows gives a column the same bits whatever the width."""
    x = np.random.default_rng(7).standard_normal((50, 9))  # float64: sums that round
    wide = robust.mean_rows(x)
    assert wide.tobytes() == np.mean(x, axis=0).tobytes()
    narrow = by_slices(robust.mean_rows, x, 1)
    assert narrow.tobytes() == wide.tobytes()
    column = [np.ascontiguousarray(x[:, i : i + 1]) for i in range(9)]  # as a shard holds it
    differs = [np.mean(c, axis=0)[0] != wide[i] for i, c in enumerate(column)]
    assert any(differs), "the guard: numpy's own single-column mean has other bits here"


def test_trimming_drops_int_beta_n_values_on_each_side() -> None:
    x = np.array([[1.0], [2.0], [3.0], [4.0], [100.0]])
    assert robust.trimmed_mean(x, 0.2)[0] == 3.0  # 1 and 100 dropped
    assert robust.trimmed_mean(x, 0.1)[0] == 22.0  # int(0.5) = 0: nothing dropped
    assert robust.trimmed_mean(x[:1], 0.45)[0] == 1.0


def reference_distances(x: np.ndarray) -> np.ndarray:
    n = len(x)
    return np.array([[float(np.sum((x[i] - x[j]) ** 2)) for j in range(n)] for i in range(n)])


def reference_krum(x: np.ndarray, f: int, m: int) -> list[int]:
    """Blanchard et al. 2017, multi-Krum, written plainly."""
    n = len(x)
    d = reference_distances(x)
    k = min(max(1, n - f - 2), n - 1)
    scores = []
    for i in range(n):
        others = sorted(d[i][j] for j in range(n) if j != i)
        scores.append(sum(others[:k]))
    ranked = sorted(range(n), key=lambda i: (scores[i], i))
    return sorted(ranked[:m])


def test_sq_distances_summed_over_slices_are_the_distances() -> None:
    x = stacked(11, 12, 40) + 5.0  # updates that share most of a model
    d = robust.sq_distances(x)
    assert d.tobytes() == robust.sq_distances(x).tobytes()  # deterministic
    assert np.array_equal(d, d.T) and np.all(np.diag(d) == 0) and np.all(d >= 0)
    total = sum(robust.sq_distances(x[:, i : i + 7]) for i in range(0, 40, 7))
    np.testing.assert_allclose(total, reference_distances(x), rtol=1e-9)
    np.testing.assert_allclose(d, reference_distances(x), rtol=1e-9)


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 20),
    f=st.integers(0, 5),
    m=st.integers(1, 6),
    byzantine=st.integers(0, 4),
    seed=st.integers(0, 2**32 - 1),
)
def test_krum_chooses_what_the_reference_chooses(
    n: int, f: int, m: int, byzantine: int, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 15))
    bad = min(byzantine, n // 3)
    x[:bad] = x[:bad] * 50 + 20  # boosted, far from the honest ones
    got = robust.krum_select(robust.sq_distances(x), f, m)
    assert got == reference_krum(x, f, m)
    if n >= 2 * f + 3 and bad <= f and m <= n - bad:
        assert not set(got) & set(range(bad)), "Krum chose a Byzantine update"


def test_krum_with_fewer_updates_than_its_guarantee_needs() -> None:
    """n < 2f + 3 (a deadline-sealed round, or updates excluded): one neighbour at least; one
    update is chosen alone; two tie and the lower index wins; m above n chooses all."""
    one = np.array([[1.0, 2.0]])
    assert robust.krum_select(robust.sq_distances(one), 2, 1) == [0]
    assert robust.krum_scores(robust.sq_distances(one), 2).tolist() == [0.0]
    two = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert robust.krum_select(robust.sq_distances(two), 1, 1) == [0]
    assert robust.krum_scores(robust.sq_distances(two), 1).tolist() == [13.0, 13.0]
    three = np.array([[0.0], [1.0], [10.0]])
    assert robust.krum_select(robust.sq_distances(three), 3, 5) == [0, 1, 2]
    assert robust.krum_select(robust.sq_distances(three), 3, 2) == [0, 1]
    assert robust.krum_select(np.zeros((0, 0)), 0, 1) == []


def test_no_rows_is_an_error_not_a_silent_value() -> None:
    with pytest.raises(ValueError, match="no rows"):
        robust.mean_rows(np.zeros((0, 3)))
