"""Aggregation maths: streaming chunked folds equal one-shot means; FedAdam equals Reddi et al."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from microfl.local.reference import fedavg, fedavg_mismatch
from microfl.strategy import (
    FedAdam,
    FedAvg,
    cast_like,
    check_options,
    fold,
    make_strategy,
    mean_of,
    merge,
)

SHAPES = {"w": (3, 4), "b": (4,), "s": ()}


def make_updates(seed: int, n: int, dtype: str = "float32") -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{k: (rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)).astype(dtype)
             for k, shape in SHAPES.items()} for _ in range(n)]


def one_shot(updates: list[dict[str, np.ndarray]], weights: list[int]) -> dict[str, np.ndarray]:
    """sum(w_i * x_i) / sum(w_i) in float64, the textbook way."""
    return fedavg(zip(updates, weights, strict=True))


def assert_close_to_mean(got: dict[str, np.ndarray], updates: list[dict[str, np.ndarray]],
                         weights: list[int], rel: float = 1e-9) -> None:
    """|got - mean| <= rel * sum(w_i |x_i|) / sum(w_i), elementwise (relative to the terms'
    magnitude, so cancellation to ~0 does not make the bound meaningless)."""
    expected = one_shot(updates, weights)
    w = np.array(weights, dtype=np.float64)
    for k in SHAPES:
        scale = np.tensordot(w, np.abs(np.stack([u[k].astype(np.float64) for u in updates])),
                             axes=1) / w.sum()
        assert got[k].dtype == np.float64 and got[k].shape == SHAPES[k]
        assert np.all(np.abs(got[k] - expected[k]) <= rel * scale + 1e-300), k


@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30),
       weights=st.lists(st.integers(1, 10**6), min_size=30, max_size=30), data=st.data())
def test_chunked_streaming_equals_one_shot(seed: int, n: int, weights: list[int],
                                           data: st.DataObject) -> None:
    updates = make_updates(seed, n)
    weights = weights[:n]
    order = data.draw(st.permutations(range(n)), label="order")
    # random chunk sizes over the (random) order
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=n - 1), label="cuts")) \
        if n > 1 else []
    bounds = [0, *cuts, n]
    partials = []
    for lo, hi in zip(bounds, bounds[1:], strict=False):
        acc = None
        for i in order[lo:hi]:
            acc = fold(acc, updates[i], float(weights[i]))
        assert acc is not None
        partials.append((acc, sum(weights[i] for i in order[lo:hi])))
    merge_order = data.draw(st.permutations(range(len(partials))), label="merge order")
    total, weight = None, 0
    for p in merge_order:
        total = merge(total, partials[p][0])
        weight += partials[p][1]
    assert total is not None
    assert weight == sum(weights)
    assert_close_to_mean(mean_of(total, weight), updates, weights)


@settings(max_examples=50, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(1, 30), data=st.data())
def test_order_of_folding_changes_the_mean_only_within_tolerance(seed: int, n: int,
                                                                 data: st.DataObject) -> None:
    updates = make_updates(seed, n, "float64")
    weights = data.draw(st.lists(st.integers(1, 1000), min_size=n, max_size=n))
    means = []
    for order in (list(range(n)), data.draw(st.permutations(range(n)))):
        acc = None
        for i in order:
            acc = fold(acc, updates[i], float(weights[i]))
        assert acc is not None
        means.append(mean_of(acc, sum(weights)))
    for k in SHAPES:
        np.testing.assert_allclose(means[0][k], means[1][k], rtol=1e-9, atol=1e-9)


def test_fold_accumulates_float32_in_float64() -> None:
    # 1 + 2**-30 is not representable in float32; a float32 accumulator would lose the 2**-30s
    big = {"x": np.array([1.0], np.float32)}
    tiny = {"x": np.array([2.0**-30], np.float32)}
    acc = fold(None, big, 1.0)
    for _ in range(1024):
        acc = fold(acc, tiny, 1.0)
    assert acc["x"].dtype == np.float64
    assert acc["x"][0] == 1.0 + 1024 * 2.0**-30
    # float32 products are not rounded to float32 either
    acc = fold(None, {"x": np.array([0.1], np.float32)}, 3.0)
    assert acc["x"][0] == float(np.float32(0.1)) * 3.0
    assert acc["x"][0] != float(np.float32(np.float32(0.1) * np.float32(3.0)))


def test_fold_leaves_its_input_untouched_and_updates_acc_in_place() -> None:
    update = {"x": np.array([1.0, 2.0], np.float32)}
    update["x"].setflags(write=False)  # stored updates are read-only views
    acc = fold(None, update, 2.0)
    same = fold(acc, update, 3.0)
    assert same is acc
    np.testing.assert_array_equal(acc["x"], [5.0, 10.0])
    np.testing.assert_array_equal(update["x"], [1.0, 2.0])


def test_merge_copies_the_first_partial() -> None:
    partial = {"x": np.array([1.0, 2.0])}
    partial["x"].setflags(write=False)  # partials are read-only views of stored bytes
    total = merge(None, partial)
    merge(total, {"x": np.array([10.0, 20.0])})
    np.testing.assert_array_equal(total["x"], [11.0, 22.0])
    np.testing.assert_array_equal(partial["x"], [1.0, 2.0])


def test_mean_of_no_weight_is_an_error() -> None:
    with pytest.raises(ValueError):
        mean_of({"x": np.zeros(2)}, 0)


def test_cast_like_rounds_integers_and_keeps_floats() -> None:
    like = {"i": np.zeros(6, np.int64), "u": np.zeros(3, np.uint8), "f": np.zeros(2, np.float32),
            "b": np.zeros(2, bool)}
    out = cast_like({"i": np.array([2.6, 2.4, -2.6, -2.4, 1e9 + 0.7, 0.5000001]),
                     "u": np.array([254.6, 0.4, 7.5]),
                     "f": np.array([0.1, 2.6]),
                     "b": np.array([0.4, 0.6])}, like)
    assert out["i"].dtype == np.int64
    np.testing.assert_array_equal(out["i"], [3, 2, -3, -2, 1_000_000_001, 1])
    assert out["u"].dtype == np.uint8
    np.testing.assert_array_equal(out["u"], [255, 0, 8])
    assert out["f"].dtype == np.float32
    np.testing.assert_array_equal(out["f"], np.array([0.1, 2.6], np.float32))
    np.testing.assert_array_equal(out["b"], [False, True])


def test_fedavg_is_the_mean_in_the_model_dtypes() -> None:
    current = {"w": np.zeros(3, np.float32), "n": np.zeros((), np.int32)}
    model, state = FedAvg().server_update(current, {"w": np.array([0.1, 0.2, 0.3]),
                                                    "n": np.array(6.7)}, None)
    assert state is None
    assert model["w"].dtype == np.float32 and model["n"].dtype == np.int32
    np.testing.assert_array_equal(model["w"], np.array([0.1, 0.2, 0.3], np.float32))
    assert int(model["n"]) == 7


def reference_fedadam(x: np.ndarray, mean: np.ndarray, m: np.ndarray | None, v: np.ndarray | None,
                      lr: float, b1: float, b2: float, tau: float):  # type: ignore[no-untyped-def]
    """Reddi et al. 2021, Algorithm 2 (FedAdam), written independently in float64."""
    x64 = x.astype(np.float64)
    delta = mean - x64
    m = b1 * (0.0 if m is None else m) + (1 - b1) * delta
    v = b2 * (0.0 if v is None else v) + (1 - b2) * np.square(delta)
    return (x64 + lr * m / (np.sqrt(v) + tau)).astype(x.dtype), m, v


@pytest.mark.parametrize("params", [{}, {"lr": 0.3, "beta1": 0.5, "beta2": 0.9, "tau": 1e-2}])
def test_fedadam_matches_reddi_et_al_over_three_rounds(params: dict[str, float]) -> None:
    opts = {"lr": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3, **params}
    strategy = make_strategy("fedadam", params)
    assert strategy == FedAdam(**opts)
    rng = np.random.default_rng(7)
    current = {"w": rng.standard_normal((5, 3)).astype(np.float32),
               "b": rng.standard_normal(3).astype(np.float64),
               "steps": np.array([3, 4], np.int64)}
    ref = {k: current[k] for k in ("w", "b")}
    ref_m: dict[str, np.ndarray | None] = {"w": None, "b": None}
    ref_v: dict[str, np.ndarray | None] = {"w": None, "b": None}
    state = None
    for rnd in range(3):
        mean = {k: current[k].astype(np.float64) + rng.standard_normal(current[k].shape)
                for k in ("w", "b")}
        mean["steps"] = np.array([3.4 + rnd, 4.6 + rnd])
        model, state = strategy.server_update(current, mean, state)
        assert state is not None and sorted(state) == ["m/b", "m/w", "v/b", "v/w"]
        for k in ("w", "b"):
            ref[k], ref_m[k], ref_v[k] = reference_fedadam(
                ref[k], mean[k], ref_m[k], ref_v[k], opts["lr"], opts["beta1"], opts["beta2"],
                opts["tau"])
            assert model[k].dtype == current[k].dtype
            np.testing.assert_allclose(model[k], ref[k], rtol=1e-6 if k == "w" else 1e-12)
            np.testing.assert_allclose(state[f"m/{k}"], ref_m[k], rtol=1e-12)
            np.testing.assert_allclose(state[f"v/{k}"], ref_v[k], rtol=1e-12)
            assert state[f"m/{k}"].dtype == np.float64
        # integer tensors take the (rounded) mean, not an Adam step
        assert model["steps"].dtype == np.int64
        np.testing.assert_array_equal(model["steps"], [3 + rnd, 5 + rnd])
        if rnd == 0:  # round 1 moves each coordinate towards the mean, by at most
            # lr * (1 - beta1) / sqrt(1 - beta2)
            step = model["b"] - current["b"]
            delta = mean["b"] - current["b"]
            assert np.all(np.sign(step) == np.sign(delta))
            bound = opts["lr"] * (1 - opts["beta1"]) / np.sqrt(1 - opts["beta2"])
            assert np.all(np.abs(step) <= bound * (1 + 1e-12))
            assert np.abs(step).max() > bound / 2
        current = model


def test_fedadam_state_saved_and_reloaded_gives_the_same_next_model() -> None:
    """State goes through storage as read-only float64 views; that must not change the maths."""
    from microfl.serde import tensors_from_safetensors, tensors_to_safetensors

    rng = np.random.default_rng(3)
    x = {"w": rng.standard_normal(4).astype(np.float32)}
    strategy = FedAdam(lr=0.1)
    x1, s1 = strategy.server_update(x, {"w": rng.standard_normal(4)}, None)
    assert s1 is not None
    reloaded, _ = tensors_from_safetensors(tensors_to_safetensors(s1))
    mean2 = {"w": rng.standard_normal(4)}
    a, sa = strategy.server_update(x1, mean2, s1)
    b, sb = strategy.server_update(x1, mean2, reloaded)
    assert a["w"].tobytes() == b["w"].tobytes()
    assert sa is not None and sb is not None
    assert all(sa[k].tobytes() == sb[k].tobytes() for k in sa)


def test_make_strategy() -> None:
    assert make_strategy("fedavg") == FedAvg()
    assert make_strategy("fedadam") == FedAdam()
    assert make_strategy("fedadam", {"lr": 0.5}).lr == 0.5  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="fedyogi"):
        make_strategy("fedyogi")
    with pytest.raises(ValueError):
        make_strategy("FedAvg")
    with pytest.raises(ValueError, match="coordinate-wise"):
        make_strategy("median")


@pytest.mark.parametrize(
    ("name", "options", "message"),
    [
        ("fedavg", {"lr": 0.1}, "fedavg takes clip; not lr"),
        ("median", {"beta": 0.1}, "median takes no options; not beta"),
        ("trimmed-mean", {"beta": 0.5}, r"beta=0.5 is out of range; use one in \[0, 0.5\)"),
        ("krum", {"f": 1.5}, "must be a whole number"),
        ("krum", {"m": 0}, "out of range"),
        ("dp-fedavg", {"target_quantile": 1.0}, "out of range"),
        ("dp-fedavg", {"noise_multiplier": 0}, "out of range"),
        ("fedavg", {"clip": -1}, "out of range"),
    ],
)
def test_strategy_options_are_checked_with_what_to_fix(name, options, message) -> None:
    with pytest.raises(ValueError, match=message):
        check_options(name, options)


def test_strategy_options_fill_in_defaults() -> None:
    assert check_options("trimmed-mean", {}) == {"beta": 0.1}
    assert check_options("krum", {"f": 2}) == {"f": 2.0, "m": 1.0}
    assert "target_quantile" not in check_options("dp-fedavg", {})
    assert check_options("fedavg", {"clip": 2}) == {"clip": 2.0}


def test_the_reference_holds_models_to_one_part_in_a_million_of_the_largest_weight() -> None:
    """The yardstick of every FedAvg check (microfl.local.reference): the exact result rounded
    to the model's dtypes passes, 2e-6 of the largest weight off in one tensor fails, NaN fails."""
    updates = [({"w": np.array([1.0, -3.0], np.float32), "n": np.array([2], np.int64)}, 1),
               ({"w": np.array([2.0, 5.0], np.float32), "n": np.array([5], np.int64)}, 2)]
    exact = fedavg(updates)
    np.testing.assert_array_equal(exact["w"], [5 / 3, 7 / 3])
    model = cast_like(exact, updates[0][0])
    assert fedavg_mismatch(model, exact) is None
    off = {**model, "w": model["w"] + np.float32(2e-6 * 4)}  # 4: the largest weight, "n"
    assert "tensor 'w' is 2" in (fedavg_mismatch(off, exact) or "")
    assert fedavg_mismatch({**model, "n": model["n"] + 1}, exact) is not None
    assert fedavg_mismatch({**model, "w": np.array([np.nan, 1.0], np.float32)}, exact)
