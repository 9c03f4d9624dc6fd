"""Clipping (fedavg, fedadam) and central DP (dp-fedavg) on the summing path: each model equals a
numpy reference, the noise has the configured standard deviation and is the same bytes on a
retry, a redelivery and any tree shape, adaptive clipping moves toward its quantile, and the
privacy spent is dp-accounting's. Whole rounds run in the in-process harness of
test_rounds_inprocess.py (functions-framework test clients, a FileStore, a hand-driven bus)."""

# ruff: noqa: F811 (the harness's fixtures, imported below, are the tests' parameters)
from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
import pytest
import yaml
from dp_accounting.rdp import RdpAccountant
from jsonschema import Draft202012Validator

from microfl import finalize
from microfl.exactsum import ExactSum
from microfl.jobs import load_job, model_key, optimizer_key
from microfl.local.reference import fedavg, fedavg_mismatch
from microfl.privacy import (
    DpState,
    clip_update,
    count_noise,
    epsilon,
    generator,
    next_clip,
    noise_key,
    noise_multiplier_for,
)
from microfl.rounds import record_key, update_key
from microfl.serde import tensors_from_safetensors
from test_rounds_inprocess import (  # the in-process harness and its fixtures
    JOB,
    SECRET,
    T0,
    Platform,
    apps,  # noqa: F401
    body,
    client_updates,
    initial_model,
    reset_backends,  # noqa: F401
    run_rounds,
)

Tensors = dict[str, np.ndarray]
KEY = noise_key(SECRET)
OPENAPI = Path(__file__).resolve().parents[1] / "functions" / "openapi.yaml"


def assert_documented(record: dict) -> None:
    """The record is a CommittedRound of functions/openapi.yaml, privacy and clip included."""
    components = yaml.safe_load(OPENAPI.read_text())["components"]
    schema = {"$ref": "#/components/schemas/CommittedRound", "components": components}
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(record)]
    assert errors == []


# --- references, written from the papers, not from microfl.privacy -----------------------------


def clipped(update: Tensors, base: Tensors, bound: float, dp: bool = False) -> tuple[Tensors, bool]:
    """base + min(1, C/||delta||) * delta over all floating tensors; integers as sent (dp: the
    base's)."""
    deltas = {
        k: u.astype(np.float64) - base[k].astype(np.float64)
        for k, u in update.items()
        if u.dtype.kind == "f"
    }
    norm = math.sqrt(sum(float(np.sum(d * d)) for d in deltas.values()))
    s = min(1.0, bound / norm)
    out = {
        k: (base[k] + s * deltas[k] if k in deltas else (base[k] if dp else u))
        for k, u in update.items()
    }
    return out, norm <= bound


def dp_reference(
    base: Tensors, updates: list[Tensors], bound: float, z: float, r: int, key: bytes = KEY
) -> Tensors:
    """(sum of clipped updates + N(0, (zC)^2) from the job's keyed generators) / n."""
    xs = [clipped(u, base, bound, dp=True)[0] for u in updates]
    mean = fedavg((x, 1) for x in xs)
    for k, arr in base.items():
        if arr.dtype.kind == "f":
            noise = generator(key, JOB, r, f"sum/{k}").standard_normal(arr.shape)
            mean[k] = mean[k] + noise * z * bound / len(updates)
    return mean


def state(p: Platform, version: int) -> DpState:
    data = p.store.read(optimizer_key(JOB, version))
    spec = load_job(p.store, JOB)
    return DpState.from_tensors(spec.options, tensors_from_safetensors(data)[0] if data else None)


def post_all(p: Platform, r: int, updates: dict[str, tuple[Tensors, int]]) -> None:
    for c, (u, n) in updates.items():
        assert p.post(r, c, body(u, n))[0] == 202


def spread(
    model: Tensors, clients: list[str], seed: int, scales: list[float]
) -> dict[str, tuple[Tensors, int]]:
    """Updates whose deltas have L2 norms around the given scales (some clipped, some not)."""
    rng = np.random.default_rng(seed)
    out = {}
    for c, scale in zip(clients, scales, strict=True):
        delta = {k: rng.standard_normal(v.shape) for k, v in model.items() if v.dtype.kind == "f"}
        norm = math.sqrt(sum(float(np.sum(d * d)) for d in delta.values()))
        out[c] = (
            {
                k: (
                    (v + delta[k] * scale / norm).astype(v.dtype)
                    if k in delta
                    else v + rng.integers(-5, 6, v.shape)
                )
                for k, v in model.items()
            },
            int(rng.integers(1, 500)),
        )
    return out


# --- clipping, pure ------------------------------------------------------------------------------


def test_clip_update_bounds_the_delta_over_all_floating_tensors() -> None:
    base = initial_model(1)
    [(far, _)] = spread(base, ["far"], 1, [5.0]).values()
    out, within = clip_update(far, base, 2.0)
    assert not within
    norm = math.sqrt(
        sum(
            float(np.sum((out[k] - base[k].astype(np.float64)) ** 2))
            for k in base
            if base[k].dtype.kind == "f"
        )
    )
    assert norm == pytest.approx(2.0, rel=1e-12)  # float64 values: rounding cannot exceed it
    assert all(out[k].dtype == np.float64 for k in base if base[k].dtype.kind == "f")
    np.testing.assert_array_equal(out["steps"], far["steps"])  # integers as sent
    assert np.array_equal(clip_update(far, base, 2.0, True)[0]["steps"], base["steps"])
    # same direction: the clipped delta is the delta scaled by C/||delta||
    d = far["fc.weight"].astype(np.float64) - base["fc.weight"]
    np.testing.assert_allclose(out["fc.weight"] - base["fc.weight"], d * 2.0 / 5.0, rtol=1e-6)

    [(near, _)] = spread(base, ["near"], 2, [1.0]).values()
    out, within = clip_update(near, base, 2.0)
    assert within
    for k in base:
        np.testing.assert_array_equal(out[k], near[k])  # unclipped: the same values

    # NaN and Inf are left for the exact fold to refuse; a huge finite delta is still clipped
    bad = {k: v.copy() for k, v in near.items()}
    bad["fc.bias"][0] = np.nan
    assert np.isnan(clip_update(bad, base, 2.0)[0]["fc.bias"][0])
    huge = {k: v.copy() for k, v in near.items()}
    huge["scale"] = np.array([1e300])
    out, within = clip_update(huge, base, 2.0)
    assert not within and np.all(np.isfinite(out["scale"])) and abs(out["scale"][0]) < 4


# --- clip with fedavg and fedadam ----------------------------------------------------------------


@pytest.mark.parametrize("fan_in", [1, 4])
def test_fedavg_with_clip_commits_the_clipped_weighted_mean(
    tmp_path: Path, apps: dict[str, Any], fan_in: int
) -> None:
    model = initial_model(4)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=6, fan_in=fan_in, strategy_options={"clip": 1.5})
    updates = spread(model, [f"c{i}" for i in range(6)], 4, [0.5, 1.0, 1.4, 3.0, 10.0, 100.0])
    post_all(p, 1, updates)
    p.drain()
    exact = fedavg((clipped(u, model, 1.5)[0], n) for u, n in updates.values())
    assert fedavg_mismatch(p.model(1), exact) is None
    assert fedavg_mismatch(p.model(1), fedavg(updates.values())) is not None  # clipping bit
    record = p.record(1)
    assert record is not None and record["clip"] == {"bound": 1.5, "clipped": 3}
    assert_documented(record)
    assert record["num_examples"] == sum(n for _, n in updates.values())
    assert "privacy" not in record


def test_fedadam_with_clip_commits_adam_on_the_clipped_mean(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    opts = {"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3, "clip": 0.8}
    model = initial_model(6)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=5, fan_in=2, strategy="fedadam", strategy_options=opts)
    updates = spread(model, [f"c{i}" for i in range(5)], 6, [0.2, 0.7, 2.0, 5.0, 50.0])
    post_all(p, 1, updates)
    p.drain()
    mean = fedavg((clipped(u, model, 0.8)[0], n) for u, n in updates.values())
    expected = {}
    for k, x in model.items():  # Reddi et al. 2021, first step (m and v from zero)
        if x.dtype.kind != "f":
            expected[k] = np.rint(mean[k]).astype(x.dtype)
            continue
        delta = mean[k] - x.astype(np.float64)
        m, v = (1 - opts["beta1"]) * delta, (1 - opts["beta2"]) * delta**2
        expected[k] = (x + opts["lr"] * m / (np.sqrt(v) + opts["tau"])).astype(x.dtype)
    got = p.model(1)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
    record = p.record(1)
    assert record is not None and record["clip"] == {"bound": 0.8, "clipped": 3}


# --- dp-fedavg -----------------------------------------------------------------------------------


def big_model() -> Tensors:
    rng = np.random.default_rng(9)
    return {
        "w": rng.standard_normal((160, 125)).astype(np.float32),
        "steps": np.array([3, 4], np.int64),
    }


def test_dp_noise_has_the_configured_standard_deviation(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    """Clients that send the base model back: model 1 - model 0 is the noise alone, N(0,
    (zC/n)^2) on each of 20,000 coordinates (the sample std's own error is about 0.5 %)."""
    model = big_model()
    z, bound, n = 1.3, 0.5, 5
    p = Platform(tmp_path, apps)
    p.create(
        model,
        rounds=1,
        min_clients=n,
        fan_in=2,
        strategy="dp-fedavg",
        strategy_options={"noise_multiplier": z, "clip": bound},
    )
    same = {"w": model["w"], "steps": model["steps"] + 7}  # integers sent: ignored under DP
    post_all(p, 1, {f"c{i}": (same, 10 * (i + 1)) for i in range(n)})
    p.drain()
    got = p.model(1)
    noise = got["w"].astype(np.float64) - model["w"]
    assert noise.std() == pytest.approx(z * bound / n, rel=0.03)
    assert abs(noise.mean()) < 4 * z * bound / n / math.sqrt(noise.size)
    np.testing.assert_array_equal(got["steps"], model["steps"])  # carried, not averaged
    record = p.record(1)
    assert record is not None
    assert record["num_examples"] == 150  # what the clients claimed, though each weighs 1
    assert record["examples"] == {f"c{i}": 10 * (i + 1) for i in range(n)}


def test_dp_model_is_the_noised_mean_of_clipped_updates_each_weighing_one(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    model = initial_model(8)
    p = Platform(tmp_path, apps)
    p.create(
        model,
        rounds=1,
        min_clients=6,
        fan_in=3,
        strategy="dp-fedavg",
        strategy_options={"noise_multiplier": 0.7, "clip": 1.2},
    )
    updates = spread(model, [f"c{i}" for i in range(6)], 8, [0.3, 0.9, 1.1, 2.0, 9.0, 1e4])
    post_all(p, 1, updates)
    p.drain()
    exact = dp_reference(model, [u for u, _ in updates.values()], 1.2, 0.7, 1)
    assert fedavg_mismatch(p.model(1), exact) is None
    record = p.record(1)
    assert record is not None and "clip" not in record  # the clipped count is private
    privacy = record["privacy"]
    assert privacy["round"]["clip"] == 1.2 and privacy["next_clip"] == 1.2  # fixed clip
    assert (privacy["noise_multiplier"], privacy["delta"], privacy["accountant"]) == (
        0.7,
        1e-5,
        "rdp",
    )
    assert privacy["count_noise_multiplier"] is None
    assert_documented(record)


def dp_plan(model: Tensors, seed: int, rounds: int = 2) -> list[dict[str, tuple[Tensors, int]]]:
    rng = random.Random(seed)
    return [
        client_updates(model, [f"client-{i:02d}" for i in rng.sample(range(40), 9)], seed * 10 + r)
        for r in range(rounds)
    ]


def results(p: Platform) -> dict[str, bytes]:
    """Models, server states, records and updates (job.json and seals name the fan-in)."""
    parts = ("/models/", "/optimizer/", "/record.json", "/updates/")
    return {k: v for k, v in p.snapshot().items() if any(part in k for part in parts)}


def test_dp_noise_is_the_same_bytes_on_redelivery_and_any_tree_shape(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    model = initial_model(12)
    plan = dp_plan(model, 12)
    options = {"noise_multiplier": 1.1, "clip": 2.0, "target_quantile": 0.5}
    snapshots = []
    for fan_in, rng in ((1, None), (3, random.Random(1)), (50, random.Random(2))):
        p = Platform(tmp_path / f"fan-in-{fan_in}", apps)
        p.create(
            model,
            rounds=2,
            min_clients=9,
            fan_in=fan_in,
            strategy="dp-fedavg",
            strategy_options=options,
        )
        run_rounds(p, plan, rng)  # with rng: every event twice, shuffled, uploads replayed
        snapshots.append(results(p))
    for other in snapshots[1:]:
        assert sorted(other) == sorted(snapshots[0])
        assert [k for k in other if other[k] != snapshots[0][k]] == []
    assert model_key(JOB, 2) in snapshots[0] and optimizer_key(JOB, 2) in snapshots[0]

    # a crash after the state was written and before model 1: the retry writes the same bytes
    p.store.delete(model_key(JOB, 2))
    p.store.delete(record_key(JOB, 2))
    assert finalize.commit(p.b, load_job(p.store, JOB), 2)
    assert results(p) == snapshots[0]


def test_dp_noise_differs_with_round_job_and_secret(tmp_path: Path, apps: dict[str, Any]) -> None:
    draw = {
        (k, j, r, s): generator(k, j, r, s).standard_normal(8).tobytes()
        for k in (KEY, noise_key(b"another-secret-0123456789-abcdefgh"))
        for j in ("job-1", "job-2")
        for r in (1, 2)
        for s in ("sum/w", "sum/b", "count")
    }
    assert len(set(draw.values())) == len(draw)  # every (secret, job, round, shard) its own
    assert (
        generator(KEY, "job-1", 1, "sum/w").standard_normal(8).tobytes()
        == draw[(KEY, "job-1", 1, "sum/w")]
    )

    # and through the pipeline: the same updates under another MICROFL_SECRET
    model = initial_model(13)
    [updates] = dp_plan(model, 13, rounds=1)
    models = []
    for name, secret in (("a", SECRET), ("b", SECRET), ("c", SECRET[::-1])):
        p = Platform(tmp_path / name, apps)
        p.create(model, rounds=1, min_clients=9, fan_in=2, strategy="dp-fedavg")
        post_all(p, 1, updates)
        p.b.secret = secret  # finalize's; ingest checked the tokens already
        p.drain()
        models.append(p.store.read(model_key(JOB, 1)))
    assert models[0] == models[1] != models[2]


def test_finalize_refuses_to_noise_without_a_secret() -> None:
    with pytest.raises(ValueError, match="MICROFL_SECRET"):
        noise_key(b"")


def test_adaptive_clip_moves_toward_the_target_quantile(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    """Deltas of norm 1..3 and a target quantile of 0.5: from a bound of 20 (nothing clipped)
    the bound falls, from 0.05 (everything clipped) it rises; each step is Andrew et al.'s
    with the count's keyed noise, and round r clips at the bound stored after round r-1."""
    n, rounds = 20, 4
    for start, direction in ((20.0, -1), (0.05, +1)):
        model = initial_model(14)
        p = Platform(tmp_path / f"start-{start}", apps)
        options = {"noise_multiplier": 0.5, "clip": start, "target_quantile": 0.5, "clip_lr": 0.5}
        p.create(
            model,
            rounds=rounds,
            min_clients=n,
            fan_in=4,
            strategy="dp-fedavg",
            strategy_options=options,
        )
        bound = start
        for r in range(1, rounds + 1):
            current = p.model(r - 1)
            updates = spread(
                current, [f"c{i:02d}" for i in range(n)], 100 + r, list(np.linspace(1.0, 3.0, n))
            )
            post_all(p, r, updates)
            p.drain()
            record = p.record(r)
            assert record is not None and record["privacy"]["round"]["clip"] == bound
            unclipped = sum(clipped(u, current, bound)[1] for u, _ in updates.values())
            rng = generator(KEY, JOB, r, "count")
            expected = next_clip(bound, unclipped, n, 0.5, 0.5, count_noise(n), rng)
            assert record["privacy"]["next_clip"] == expected == state(p, r).clip
            assert (expected - bound) * direction > 0
            exact = dp_reference(current, [u for u, _ in updates.values()], bound, 0.5, r)
            assert fedavg_mismatch(p.model(r), exact) is None
            bound = expected
        assert (bound < start / 2) if direction < 0 else (bound > start * 2)


def test_next_clip_is_the_geometric_update() -> None:
    rng = np.random.default_rng(0)
    assert next_clip(2.0, 10, 10, 0.5, 0.2, 0.0, rng) == pytest.approx(2.0 * math.exp(-0.1))
    assert next_clip(2.0, 0, 10, 0.5, 0.2, 0.0, rng) == pytest.approx(2.0 * math.exp(0.1))
    assert next_clip(2.0, 5, 10, 0.5, 0.2, 0.0, rng) == pytest.approx(2.0)


# --- accounting ----------------------------------------------------------------------------------


def direct_epsilon(z: float, sigma_b: float | None, rounds: int, delta: float) -> float:
    per_round = [dp_accounting.GaussianDpEvent(z)]
    if sigma_b is not None:
        per_round.append(dp_accounting.GaussianDpEvent(sigma_b))
    accountant = RdpAccountant()
    for _ in range(rounds):
        for event in per_round:
            accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def test_record_epsilon_is_dp_accountings_and_an_empty_round_spends_nothing(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    """Rounds 1 and 3 release models; round 2 has only a NaN update (stored past ingest) and
    seals by deadline: it spends nothing, its state is round 1's, and round 3 clips at the
    bound round 1 chose."""
    z, delta, n = 0.9, 1e-6, 4
    model = initial_model(15)
    p = Platform(tmp_path, apps)
    p.create(
        model,
        rounds=3,
        min_clients=n,
        round_timeout=5,
        fan_in=2,
        strategy="dp-fedavg",
        strategy_options={
            "noise_multiplier": z,
            "delta": delta,
            "clip": 3.0,
            "target_quantile": 0.3,
        },
    )
    post_all(p, 1, client_updates(model, [f"c{i}" for i in range(n)], 151))
    p.drain()
    record1 = p.record(1)
    assert record1 is not None
    sigma_b = count_noise(n)
    assert sigma_b == n / 20
    one = direct_epsilon(z, sigma_b, 1, delta)
    assert record1["privacy"]["round"]["epsilon"] == pytest.approx(one, rel=1e-9)
    assert record1["privacy"]["cumulative"] == {
        "epsilon": pytest.approx(one, rel=1e-9),
        "rounds": 1,
    }
    assert record1["privacy"]["count_noise_multiplier"] == sigma_b
    assert_documented(record1)

    poisoned = {k: a.copy() for k, a in p.model(1).items()}
    poisoned["fc.weight"][0, 0] = np.inf
    p.store.create(update_key(JOB, 2, "c0"), body(poisoned, 10))
    p.ping(record1["committed_at"] + 6)
    p.drain()
    record2 = p.record(2)
    assert record2 is not None and record2["included"] == []
    assert "NaN or Inf" in record2["excluded"][0]["reason"]
    assert record2["privacy"]["round"]["epsilon"] == 0.0
    assert record2["privacy"]["cumulative"]["rounds"] == 1
    assert p.store.read(optimizer_key(JOB, 2)) == p.store.read(optimizer_key(JOB, 1))
    assert p.store.read(model_key(JOB, 2)) == p.store.read(model_key(JOB, 1))

    post_all(p, 3, client_updates(p.model(2), [f"c{i}" for i in range(n)], 153))
    p.drain()
    record3 = p.record(3)
    assert record3 is not None
    assert record3["privacy"]["round"]["clip"] == record1["privacy"]["next_clip"]
    two = direct_epsilon(z, sigma_b, 2, delta)
    assert record3["privacy"]["cumulative"]["epsilon"] == pytest.approx(two, rel=1e-9)
    assert record3["privacy"]["cumulative"]["rounds"] == 2
    assert p.get("")["state"] == "done"


@pytest.mark.parametrize(
    ("target", "rounds", "sigma_b"),
    [(1.0, 10, None), (4.0, 10, None), (8.0, 30, None), (8.0, 10, 5.0)],
)
def test_noise_multiplier_for_a_target_epsilon(
    target: float, rounds: int, sigma_b: float | None
) -> None:
    z = noise_multiplier_for(target, rounds, 1e-5, sigma_b)
    assert direct_epsilon(z, sigma_b, rounds, 1e-5) <= target * (1 + 1e-6)
    assert direct_epsilon(z * 0.99, sigma_b, rounds, 1e-5) > target
    assert epsilon(z, 1e-5, rounds, sigma_b) == pytest.approx(
        direct_epsilon(z, sigma_b, rounds, 1e-5), rel=1e-9
    )


def test_noise_multiplier_for_says_when_the_count_alone_spends_the_budget() -> None:
    with pytest.raises(ValueError, match="raise min_clients"):
        noise_multiplier_for(1.0, 10, 1e-5, count_noise(10))


# --- the NaN/Inf guard ---------------------------------------------------------------------------


def test_non_finite_aggregate_under_dp_writes_no_state_and_carries_the_model(
    tmp_path: Path, apps: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model = initial_model(16)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=3, fan_in=1, strategy="dp-fedavg")
    post_all(p, 1, client_updates(model, ["a", "b", "c"], 16))
    finish = ExactSum.finish
    monkeypatch.setattr(
        ExactSum, "finish", lambda self, w=None: {k: v * np.inf for k, v in finish(self, w).items()}
    )
    p.drain()
    record = p.record(1)
    assert record is not None and record["included"] == []
    assert p.store.read(model_key(JOB, 1)) == p.store.read(model_key(JOB, 0))
    assert p.store.read(optimizer_key(JOB, 1)) is None  # nothing released, nothing spent
    assert record["privacy"]["cumulative"] == {"epsilon": 0.0, "rounds": 0}


def test_nan_update_is_excluded_under_clip(tmp_path: Path, apps: dict[str, Any]) -> None:
    model = initial_model(17)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=1, min_clients=3, fan_in=2, strategy_options={"clip": 1.0})
    updates = spread(model, ["a", "b"], 17, [0.5, 4.0])
    poisoned = {k: a.copy() for k, a in model.items()}
    poisoned["fc.bias"][1] = np.nan
    p.store.create(update_key(JOB, 1, "m"), body(poisoned, 5))
    post_all(p, 1, updates)
    p.drain()
    p.ping(T0 + 2)
    p.drain()
    record = p.record(1)
    assert record is not None and record["included"] == ["a", "b"]
    [excluded] = record["excluded"]
    assert excluded["client"] == "m" and "NaN or Inf" in excluded["reason"]
    exact = fedavg((clipped(u, model, 1.0)[0], n) for u, n in updates.values())
    assert fedavg_mismatch(p.model(1), exact) is None
    assert record["clip"] == {"bound": 1.0, "clipped": 1}
