"""Exact sums: any order and any merge tree of the same updates give the same bytes; the mean is
within the documented bound of the exact one (fractions); refused updates leave no trace."""

from __future__ import annotations

import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microfl import foldloops
from microfl.exactsum import MAX_UPDATES, ExactSum, ValueOutOfRange

SHAPES = {"w": (3, 5), "b": (4,), "s": (), "big": (5000,)}


def make_base(rng: np.random.Generator) -> dict[str, np.ndarray]:
    base = {k: np.asarray(rng.standard_normal(s) * 0.1, np.float32) for k, s in SHAPES.items()}
    base["b"][...] = 0  # a zero tensor: its grid comes from the floor
    return base


def make_updates(rng: np.random.Generator, n: int, spread: int = 3) -> list[dict[str, np.ndarray]]:
    return [
        {
            k: np.asarray(
                rng.standard_normal(s) * 10.0 ** rng.integers(-spread, spread + 1), np.float32
            )
            for k, s in SHAPES.items()
        }
        for _ in range(n)
    ]


def tree_sum(base: dict, updates: list, weights: list[int], rnd: random.Random) -> ExactSum:
    """Random leaves (fold or fold_many), merged in a random tree, through storage arrays."""
    order = list(range(len(updates)))
    rnd.shuffle(order)
    parts = []
    while order:
        k = rnd.randint(1, 4)
        leaf, order = order[:k], order[k:]
        acc = ExactSum(base)
        if rnd.random() < 0.5:
            assert acc.fold_many([updates[i] for i in leaf], [weights[i] for i in leaf]) == []
        else:
            for i in leaf:
                acc.fold(updates[i], weights[i])
        parts.append(ExactSum.from_arrays(base, acc.to_arrays(), acc.count, acc.weight))
    while len(parts) > 1:
        rnd.shuffle(parts)
        a, b = parts.pop(), parts.pop()
        a.merge(b)
        parts.append(a)
    return parts[0]


def as_bytes(acc: ExactSum) -> dict[str, bytes]:
    return {k: v.tobytes() for k, v in acc.to_arrays().items()}


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 12), heavy=st.booleans())
def test_any_order_and_tree_gives_the_same_bytes(seed: int, n: int, heavy: bool) -> None:
    rng = np.random.default_rng(seed)
    base = make_base(rng)
    limit = ExactSum(base).xlim  # values past it are refused (tested below), not summed
    updates = [
        {k: np.clip(v, -limit[k] / 2, limit[k] / 2) for k, v in u.items()}
        for u in make_updates(rng, n)
    ]
    top = 10**12 if heavy else 10**6
    weights = [int(w) for w in rng.choice([1, 2, 3, top - 1, top, int(rng.integers(1, top))], n)]
    rnd = random.Random(seed)
    first = tree_sum(base, updates, weights, rnd)
    for _ in range(3):
        other = tree_sum(base, updates, weights, rnd)
        assert as_bytes(other) == as_bytes(first)
        assert (other.count, other.weight) == (n, sum(weights))
    assert all(
        a.tobytes() == b.tobytes()
        for a, b in zip(first.finish().values(), other.finish().values(), strict=True)
    )
    assert foldloops.kernel() is not None, "numba is a dependency: its kernel made `first`"
    with pytest.MonkeyPatch.context() as mp:  # the numpy kernel gives the same bytes
        mp.setattr(foldloops, "kernel", lambda kind="float": None)
        plain = ExactSum(base)
        for u, w in zip(updates, weights, strict=True):
            plain.fold(u, w)
    assert as_bytes(plain) == as_bytes(first)


def exact_mean(updates: list, weights: list[int], name: str) -> list[Fraction]:
    total = sum(weights)
    flat = [u[name].astype(np.float64).reshape(-1) for u in updates]
    return [
        sum(Fraction(float(f[i])) * w for f, w in zip(flat, weights, strict=True)) / total
        for i in range(flat[0].size)
    ]


@pytest.mark.parametrize("case", ["mixed", "tiny_and_huge", "zeros", "far_above_base", "cancel"])
def test_mean_within_bound_of_the_exact_mean(case: str) -> None:
    rng = np.random.default_rng(7)
    base = make_base(rng)
    updates = make_updates(rng, 6)
    weights = [1, 10**12, 5, 999_999_999_989, 2, 123_456_789]
    if case == "tiny_and_huge":  # one huge weight: the small ones still count
        weights = [1, 1, 1, 1, 1, 10**12]
    if case == "zeros":
        for u in updates:
            u["w"][...] = 0
    if case == "far_above_base":  # 2**17 times the base's scale (the limit is 2**18 here)
        for u in updates:
            u["big"] = (np.sign(u["big"]) * 2.0**17 * 0.1).astype(np.float32)
    if case == "cancel":  # the mean cancels to ~1e-6 of the terms
        for u in updates[3:]:
            for k in u:
                u[k] = -updates[0][k]
        weights = [1, 1, 1, 1, 1, 1]
        updates[1] = {k: (v * 1e-6).astype(np.float32) for k, v in updates[1].items()}
        updates[2] = {k: v.copy() for k, v in updates[0].items()}
    acc = ExactSum(base)
    assert acc.fold_many(updates, weights) == []
    mean = acc.finish()
    total = sum(weights)
    for name in SHAPES:
        want = exact_mean(updates, weights, name)
        got = mean[name].reshape(-1)
        g = 2.0 ** acc.grid[name]
        terms = (
            sum(
                np.abs(u[name].astype(np.float64)).reshape(-1) * w
                for u, w in zip(updates, weights, strict=True)
            )
            / total
        )
        for i, (e, m) in enumerate(zip(want, got.tolist(), strict=True)):
            err = abs(Fraction(m) - e)
            bound = (
                g / 2 * len(weights) / total + 2.0**-53 * terms[i] + 4 * 2.0**-53 * abs(float(e))
            )
            assert err <= Fraction(bound), (name, i, float(err), bound)
        top = max(abs(float(e)) for e in want)
        worst = max(abs(float(Fraction(m) - e)) for e, m in zip(want, got.tolist(), strict=True))
        assert worst <= 1e-6 * top or worst == 0.0, (name, worst, top)


def test_refused_updates_leave_no_trace() -> None:
    rng = np.random.default_rng(3)
    base = make_base(rng)
    updates = make_updates(rng, 5)
    weights = [3, 1, 10**12, 7, 2]
    good = ExactSum(base)
    good.fold_many([updates[i] for i in (0, 2, 4)], [weights[i] for i in (0, 2, 4)])
    bad1 = {k: v.copy() for k, v in updates[1].items()}
    bad1["big"][4999] = np.nan  # in the last block of the last tensor
    bad3 = {k: v.copy() for k, v in updates[3].items()}
    bad3["s"][...] = 1e30  # far beyond 2**18 times the base's scale
    acc = ExactSum(base)
    refused = acc.fold_many([updates[0], bad1, updates[2], bad3, updates[4]], weights)
    assert [k for k, _ in refused] == [1, 3]
    assert "NaN or Inf" in str(refused[0][1]) and "'s' has a value of 1e+30" in str(refused[1][1])
    assert as_bytes(acc) == as_bytes(good) and (acc.count, acc.weight) == (3, good.weight)
    with pytest.raises(ValueOutOfRange):
        acc.fold({k: np.full(s, np.inf, np.float32) for k, s in SHAPES.items()}, 1)
    assert as_bytes(acc) == as_bytes(good)


def test_limits_are_refused() -> None:
    rng = np.random.default_rng(4)
    base = make_base(rng)
    (u,) = make_updates(rng, 1)
    acc = ExactSum(base, max_weight=10**6)
    for w in (0, -1, 10**6 + 1, 1.5):
        with pytest.raises(ValueError, match="weight"):
            acc.fold(u, w)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="dtypes"):  # F64, F16, BF16 taken
        acc.fold({k: v.astype(np.int16) for k, v in u.items()}, 1)
    acc.count = MAX_UPDATES
    with pytest.raises(OverflowError):
        acc.fold(u, 1)
    other = ExactSum(base, max_weight=10**6)
    other.count = 1
    with pytest.raises(OverflowError):
        acc.merge(other)
    with pytest.raises(ValueError, match="grids"):
        ExactSum(base).merge(ExactSum({k: v * 1000 for k, v in base.items()}))
    with pytest.raises(ValueError, match="no updates"):
        ExactSum(base).finish()


def test_worst_case_magnitudes_do_not_overflow() -> None:
    """2**21 updates at the largest weight, every value at its limit, one sign: T stays below
    2**119, so hi cannot wrap. (Folded as one update's limbs times 2**21, by merging.)"""
    base = {"x": np.array([1.0, -1.0, 0.0], np.float32)}
    acc = ExactSum(base)
    lim = np.nextafter(np.float32(acc.xlim["x"]), np.float32(0))
    acc.fold({"x": np.array([lim, -lim, lim], np.float32)}, 10**12)
    for _ in range(21):  # doubling: 2**21 copies
        acc.merge(ExactSum.from_arrays(base, acc.to_arrays(), 0, acc.weight))
    mean = acc.finish(10**12 * 2**21)["x"]
    np.testing.assert_allclose(mean, [lim, -lim, lim], rtol=1e-15, atol=0)
    assert acc.hi["x"][0] > 2**61 and acc.hi["x"][1] < -(2**61)  # near 2**63, not wrapped


def test_float64_updates_of_float32_tensors_sum_like_their_values() -> None:
    """Clipped updates reach the sum in float64 (privacy.clip_update): a float32 tensor takes
    them, and float32 values given as float64 give the same bytes; integer tensors do not."""
    rng = np.random.default_rng(7)
    base = make_base(rng)
    updates = make_updates(rng, 5)
    narrow, wide = ExactSum(base), ExactSum(base)
    narrow.fold_many(updates, [3, 1, 4, 1, 5])
    wide.fold_many([{k: v.astype(np.float64) for k, v in u.items()} for u in updates],
                   [3, 1, 4, 1, 5])
    assert all(np.array_equal(a, wide.to_arrays()[k]) for k, a in narrow.to_arrays().items())
    ints = ExactSum({"n": np.array([1, 2], np.int64)})
    with pytest.raises(ValueError, match="dtypes differ"):
        ints.fold({"n": np.array([1.0, 2.0])}, 1)


def test_merge_arrays_is_merge_of_from_arrays() -> None:
    """The commit's shortcut adds the same integers as merge(from_arrays(...)), and refuses a
    non-canonical or misshapen partial leaving the sum as it was."""
    rng = np.random.default_rng(7)
    base = make_base(rng)
    parts = []
    for _ in range(3):
        acc = ExactSum(base)
        acc.fold_many(make_updates(rng, 3), [3, 1, 4])
        parts.append(acc)
    via_from, via_arrays = ExactSum(base), ExactSum(base)
    for part in parts:
        via_from.merge(ExactSum.from_arrays(base, part.to_arrays(), part.count, part.weight))
        via_arrays.merge_arrays(part.to_arrays(), part.count, part.weight)
    assert as_bytes(via_arrays) == as_bytes(via_from)
    assert (via_arrays.count, via_arrays.weight) == (via_from.count, via_from.weight) == (9, 24)
    before = as_bytes(via_arrays)
    bad = parts[0].to_arrays()
    bad["lo/b"] = bad["lo/b"].copy()
    bad["lo/b"].reshape(-1)[-1] = -1
    with pytest.raises(ValueError, match="not canonical"):
        via_arrays.merge_arrays(bad, 1, 1)
    misshapen = {**parts[0].to_arrays(), "hi/b": np.zeros(1, np.int64)}
    with pytest.raises(ValueError, match="does not match"):
        via_arrays.merge_arrays(misshapen, 1, 1)
    assert as_bytes(via_arrays) == before and via_arrays.count == 9


@pytest.mark.parametrize("numba", [True, False])
def test_deltas_fold_like_their_float64_arrays(
    numba: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fold_many(xs, w, bases, scales) gives the bytes, refusals and messages of folding the
    float64 arrays (x - base) * scale, with the numba kernel and without it; a refused delta
    (NaN, or beyond the grid's range) leaves no trace."""
    if not numba:
        real = foldloops.kernel  # only the delta loop falls back to numpy
        monkeypatch.setattr(
            foldloops, "kernel", lambda kind="float": None if kind == "delta" else real(kind)
        )
    rng = np.random.default_rng(11)
    grid = {k: v.astype(np.float64) for k, v in make_base(rng).items()}
    bases = [make_base(rng) for _ in range(3)]
    xs = make_updates(rng, 6)
    xs[2] = {**xs[2], "big": xs[2]["big"].copy()}
    xs[2]["big"][4000] = np.nan  # refused in the last tensor, after others were folded
    xs[4] = {**xs[4], "w": np.full((3, 5), 3e30, np.float32)}  # beyond the range
    picked = [bases[i % 3] for i in range(6)]
    scales = [1.0, 0.5**0.5, 1 / 3**0.5, 1.0, 0.5, 1 / 5**0.5]
    weights = [3, 1, 4, 1, 5, 9]
    fused, arrays = ExactSum(grid), ExactSum(grid)
    got = fused.fold_many(xs, weights, bases=picked, scales=scales)
    with np.errstate(all="ignore"):
        ys = [
            {k: np.subtract(x[k], b[k], dtype=np.float64) * s for k in x}
            for x, b, s in zip(xs, picked, scales, strict=True)
        ]
    want = arrays.fold_many(ys, weights)
    assert [(i, str(e)) for i, e in got] == [(i, str(e)) for i, e in want]
    assert [i for i, _ in got] == [2, 4]
    assert as_bytes(fused) == as_bytes(arrays)
    assert (fused.count, fused.weight) == (arrays.count, arrays.weight) == (4, 14)
    with pytest.raises(ValueError, match="one base and one scale"):
        fused.fold_many(xs[:1], [1], bases=picked[:1])
