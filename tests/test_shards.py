"""Robust rounds on the pipeline (microfl.shards): the committed model is numpy's or scipy's
statistic over the stacked float64 updates cast to the model's dtypes, Krum's choice is the
reference's, whatever the shard width, the delivery (duplicated, lost, reordered) or the crashes;
an invalid stored update is left out by every shard alike; the matrix respects the budget."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.stats
from functions_framework import create_app
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from microfl import events, faults, finalize, shards
from microfl.jobs import JobSpec, TensorSpec, model_key
from microfl.local.invariants import check_job
from microfl.rounds import Rounds, Seal, record_key, seal_key, selection_key, update_key
from microfl.serde import tensors_from_safetensors, tensors_to_safetensors
from microfl.strategy import cast_like
from test_robust import reference_krum
from test_rounds_inprocess import JOB, MAIN, T0, Platform, body
from treeplay import Play

Tensors = dict[str, np.ndarray]
STRATEGIES = [("median", {}), ("trimmed-mean", {"beta": 0.2}), ("krum", {"f": 1, "m": 2})]
SHARD_FAILPOINTS = [n for n in faults.FAILPOINTS if n.startswith(("shards.", "finalize."))]


def model() -> Tensors:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((4, 5)).astype(np.float32),
        "b": rng.standard_normal(5).astype(np.float64),
        "h": rng.standard_normal(3).astype(np.float16),
        "steps": np.array([10, 20], np.int64),
    }


def updates(n: int, seed: int, like: Tensors | None = None) -> dict[str, tuple[Tensors, int]]:
    """n clients; a few Byzantine ones (boosted, huge num_examples) so the statistics matter."""
    rng = np.random.default_rng(seed)
    base = like or model()
    out = {}
    for i in range(n):
        boost = 100.0 if i % 5 == 4 else 1.0
        u = {
            k: (v + rng.standard_normal(v.shape) * boost).astype(v.dtype)
            if v.dtype.kind == "f"
            else v + rng.integers(-5, 6, v.shape)
            for k, v in base.items()
        }
        out[f"c{i:02d}"] = (u, 10**6 if boost > 1 else int(rng.integers(1, 500)))
    return out


def reference(strategy: str, options: dict, ups: list[Tensors], like: Tensors) -> Tensors:
    """The statistic over the whole stacked float64 updates, as numpy and scipy compute it."""
    out = {}
    if strategy == "krum":
        flat = np.stack(
            [np.concatenate([u[k].astype(np.float64).ravel() for k in like]) for u in ups]
        )
        chosen = reference_krum(flat, int(options["f"]), int(options["m"]))
        ups = [ups[i] for i in chosen]
    for k in like:
        x = np.stack([u[k].astype(np.float64) for u in ups])
        if strategy == "median":
            out[k] = np.median(x, axis=0)
        elif strategy == "trimmed-mean":
            out[k] = scipy.stats.trim_mean(x, options["beta"], axis=0)
        else:
            out[k] = np.mean(x, axis=0)  # unweighted
    return cast_like(out, like)


def assert_model(got: Tensors, want: Tensors) -> None:
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].tobytes() == want[k].tobytes(), k


# --- through the functions (functions-framework test clients) ------------------------------------


@pytest.fixture(scope="module")
def apps() -> dict[str, Any]:
    return {n: create_app(n, MAIN).test_client() for n in ("ingest", "aggregate", "finalize")}


@pytest.mark.parametrize(("strategy", "options"), STRATEGIES)
def test_a_robust_round_commits_the_reference_statistic(
    tmp_path: Path,
    apps: dict[str, Any],
    strategy: str,
    options: dict,
) -> None:
    p = Platform(tmp_path, apps)
    m0 = model()
    p.create(m0, rounds=2, min_clients=10, fan_in=3, strategy=strategy, strategy_options=options)
    ups = updates(10, 1)
    for i, (c, (u, n)) in enumerate(ups.items()):
        assert p.post(1, c, body(u, n))[0] == 202
        if i < 9:  # no eager folding: nothing is requested before the seal
            assert [e.type for _, e in p.take() if e.type == events.PARTIAL_REQUESTED] == []
    assert p.drain() > 0
    assert_model(p.model(1), reference(strategy, options, [u for u, _ in ups.values()], m0))
    record = p.record(1)
    assert record is not None and record["strategy"] == strategy
    assert record["included"] == sorted(ups) and record["excluded"] == []
    assert record["examples"] == {c: n for c, (_, n) in ups.items()}
    if strategy == "krum":
        flat = [
            np.concatenate([u[k].astype(np.float64).ravel() for k in m0]) for u, _ in ups.values()
        ]
        chosen = reference_krum(np.stack(flat), 1, 2)
        assert record["selected"] == [sorted(ups)[i] for i in chosen]
        assert not set(record["selected"]) & {"c04", "c09"}  # the boosted ones
        assert sorted(record["scores"]) == sorted(ups)
        assert p.get("/rounds/1")["scores"] == record["scores"]  # the operator sees them
        seen = (
            p.apps["ingest"]
            .get(f"/v1/jobs/{JOB}/rounds/1", headers={"Authorization": f"Bearer {p.token('c00')}"})
            .get_json()
        )
        assert "scores" not in seen and "examples" not in seen  # a client does not
        assert seen["selected"] == record["selected"]
    assert check_job(p.store, JOB, {(1, c) for c in ups}).ok
    assert [e.data["round"] for e in p.committed] == [1]

    # round 2 trains on model 1 like any other round
    ups2 = updates(10, 2, p.model(1))
    for c, (u, n) in ups2.items():
        assert p.post(2, c, body(u, n))[0] == 202
    p.drain()
    assert_model(p.model(2), reference(strategy, options, [u for u, _ in ups2.values()], m0))
    assert p.get("")["state"] == "done"


def test_the_sweep_recovers_lost_shard_requests_and_readies(
    tmp_path: Path,
    apps: dict[str, Any],
) -> None:
    p = Platform(tmp_path, apps)
    m0 = model()
    p.create(m0, rounds=1, min_clients=6, strategy="krum", strategy_options={"f": 1})
    ups = updates(6, 3)
    for c, (u, n) in ups.items():
        assert p.post(1, c, body(u, n))[0] == 202
    queue = p.take()
    while queue:  # every partial.requested is lost
        topic, event = queue.pop(0)
        if event.type != events.PARTIAL_REQUESTED:
            p.deliver(topic, event)
        queue += p.take()
    assert p.store.exists(seal_key(JOB, 1)) and p.record(1) is None
    for at in (T0 + 1 + finalize.RESEND_AFTER * k for k in (2, 6, 14)):
        p.ping(at)
        p.drain()
    assert p.record(1) is not None
    assert_model(p.model(1), reference("krum", {"f": 1, "m": 1}, [u for u, _ in ups.values()], m0))


def test_nothing_is_requested_before_the_seal_even_by_the_sweep(
    tmp_path: Path, apps: dict[str, Any]
) -> None:
    """A request before the seal would be refused, and its marker would hold back the real
    request after the seal until the sweep's resend."""
    p = Platform(tmp_path, apps)
    p.create(model(), rounds=1, min_clients=8, fan_in=2, round_timeout=300, strategy="median")
    ups = updates(8, 4)
    for c, (u, n) in list(ups.items())[:7]:
        assert p.post(1, c, body(u, n))[0] == 202
    p.drain()
    p.ping(T0 + 100)  # before the deadline: the sweep looks at the open round
    assert p.take() == [] and p.store.list(f"jobs/{JOB}/rounds/00000001/requests/") == []
    u, n = ups["c07"]
    assert p.post(1, "c07", body(u, n))[0] == 202
    p.drain()  # the seal requests the shards at once, no resend needed
    assert p.record(1) is not None


# --- any history, any width: the same bytes (in-process driver) -----------------------------------


def run(
    play: Play, ups: dict[str, tuple[Tensors, int]], rng: random.Random, drop: float, dup: float
) -> None:
    order = list(ups)
    rng.shuffle(order)
    while order or play.queue:
        if order and (not play.queue or rng.random() < 0.5):
            c = order.pop(0)
            if play.post(1, c, *ups[c]) in (0, 503):
                order.append(c)
        else:
            play.step(rng, drop, dup)
    t = T0 + 1
    for _ in range(60):
        if play.store.exists(record_key("job", 1)):
            return
        t += finalize.RESEND_AFTER * 4
        play.ping(t)
        while play.queue:
            play.step(rng, drop / 2, dup)


@settings(
    max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    which=st.integers(0, 2),
    n=st.integers(1, 9),
    width=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    crashes=st.lists(st.tuples(st.sampled_from(SHARD_FAILPOINTS), st.integers(1, 3)), max_size=3),
    drop=st.sampled_from([0.0, 0.2]),
    dup=st.sampled_from([0.0, 0.5]),
)
def test_any_width_and_history_commits_the_reference_bytes(
    monkeypatch: pytest.MonkeyPatch,
    which: int,
    n: int,
    width: int,
    seed: int,
    crashes: list[tuple[str, int]],
    drop: float,
    dup: float,
) -> None:
    strategy, options = STRATEGIES[which]
    m0 = model()
    ups = updates(n, seed % 1000)
    with monkeypatch.context() as mp:
        mp.setattr(
            shards,
            "layout",
            lambda spec, sealed: shards.Layout(spec, len(sealed.clients), min(width, 30)),
        )
        quorum = max(n, 5) if strategy == "krum" else n  # krum f=1: 2f+3; a deadline seals less
        play = Play(
            m0,
            mp,
            rounds=1,
            min_clients=quorum,
            strategy=strategy,
            strategy_options=options,
            round_timeout=30.0,
        )
        mp.setattr(shards, "failpoint", play._failpoint)
        play.armed = dict(crashes)
        run(play, ups, random.Random(seed), drop, dup)
        record = json.loads(play.store.objects[record_key("job", 1)])
        got = tensors_from_safetensors(play.store.objects[model_key("job", 1)])[0]
        verdict = check_job(play.store, "job", {(1, c) for c in ups}, slack=1e9)
        assert verdict.ok, verdict
    assert record["included"] == sorted(ups) and record["excluded"] == []
    krum = {"f": 1, "m": 2} if strategy == "krum" else options
    assert_model(got, reference(strategy, krum, [u for u, _ in ups.values()], m0))


# --- invalid stored updates, tiny rounds, memory ------------------------------------------------


def big_model() -> Tensors:
    """Large enough that an update is longer than its header limit (the size probe runs)."""
    rng = np.random.default_rng(9)
    return {
        "w": rng.standard_normal((40, 50)).astype(np.float32),
        "b": rng.standard_normal(50).astype(np.float32),
    }


def invalid_bodies(update: Tensors) -> dict[str, bytes]:
    good = tensors_to_safetensors(update, {"num_examples": "5"})
    transposed = {**update, "w": np.ascontiguousarray(update["w"].T)}
    return {
        "x-truncated": good[:-4],
        "x-trailing": good + b"\0" * 8,
        "x-shape": tensors_to_safetensors(transposed, {"num_examples": "5"}),
        "x-examples": tensors_to_safetensors(update, {"num_examples": "0"}),
        "x-garbage": b"\xff" * 64,
    }


@pytest.mark.parametrize(("strategy", "options"), STRATEGIES)
def test_an_invalid_stored_update_is_left_out_by_every_shard_alike(
    monkeypatch: pytest.MonkeyPatch, strategy: str, options: dict
) -> None:
    m0 = big_model()
    ups = updates(7, 5, m0)
    layout = shards.layout
    monkeypatch.setattr(
        shards,
        "layout",
        lambda spec, sealed: shards.Layout(
            spec, len(sealed.clients), min(layout(spec, sealed).width, 300)
        ),
    )  # several shards
    play = Play(
        m0,
        monkeypatch,
        rounds=1,
        min_clients=12,
        strategy=strategy,
        strategy_options=options,
        memory_budget=1 << 20,
        round_timeout=5.0,
    )
    bad = invalid_bodies(ups["c00"][0])
    assert len(bad["x-truncated"]) > 8 + play.spec.header_limit  # the size probe runs
    for c, data in bad.items():  # stored behind ingest's back (it would refuse them)
        assert play.store.create(update_key("job", 1, c), data)
    for c, (u, n) in ups.items():
        assert play.post(1, c, u, n) == 202
        while play.queue:
            play.step(None)
    play.ping(T0 + 10)  # the bad ones hold no slot: the sweep's listing sees the quorum
    while play.queue:
        play.step(None)
    rounds = Rounds(play.store, play.spec)
    sealed = rounds.seal(1)
    assert sealed is not None and len(sealed.clients) == 12
    lay = shards.layout(play.spec, sealed)
    assert lay.count == 7, "several shards, each deciding for itself"
    metas = {shards.read_node(rounds, 1, 0, j)[1] for j in range(lay.count)}
    assert len(metas) == 1
    record = json.loads(play.store.objects[record_key("job", 1)])
    assert record["included"] == sorted(ups)
    reasons = {e["client"]: e["reason"] for e in record["excluded"]}
    assert sorted(reasons) == sorted(bad)
    assert all(why.startswith("stored update is invalid: ") for why in reasons.values())
    assert "has shape (50, 40)" in reasons["x-shape"]
    assert "num_examples" in reasons["x-examples"]
    assert (
        "bytes its header" in reasons["x-truncated"] and "bytes its header" in reasons["x-trailing"]
    )
    got = tensors_from_safetensors(play.store.objects[model_key("job", 1)])[0]
    krum = {"f": 1, "m": 2} if strategy == "krum" else options
    assert_model(got, reference(strategy, krum, [u for u, _ in ups.values()], m0))


@pytest.mark.parametrize(("strategy", "options"), STRATEGIES)
@pytest.mark.parametrize("n", [1, 2])
def test_a_round_of_one_or_two_updates(
    monkeypatch: pytest.MonkeyPatch, strategy: str, options: dict, n: int
) -> None:
    """Sealed by the deadline short of quorum (krum's 2f+3 included)."""
    m0 = model()
    ups = updates(n, 7)
    play = Play(
        m0,
        monkeypatch,
        rounds=1,
        min_clients=5,
        strategy=strategy,
        strategy_options=options,
        round_timeout=5.0,
    )
    for c, (u, n_) in ups.items():
        assert play.post(1, c, u, n_) == 202
    while play.queue:
        play.step(None)
    assert not play.store.exists(seal_key("job", 1))
    play.ping(T0 + 10)
    while play.queue:
        play.step(None)
    record = json.loads(play.store.objects[record_key("job", 1)])
    assert record["sealed_reason"] == "deadline" and record["included"] == sorted(ups)
    got = tensors_from_safetensors(play.store.objects[model_key("job", 1)])[0]
    krum = {"f": 1, "m": 2} if strategy == "krum" else options
    assert_model(got, reference(strategy, krum, [u for u, _ in ups.values()], m0))
    if strategy == "krum":
        selection = json.loads(play.store.objects[selection_key("job", 1)])
        assert selection["clients"] == sorted(ups)  # m = 2 >= n: all of them


def test_a_round_whose_updates_are_all_invalid_keeps_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m0 = model()
    play = Play(m0, monkeypatch, rounds=1, min_clients=2, strategy="median", round_timeout=5.0)
    play.store.create(update_key("job", 1, "a"), b"\xff" * 64)
    play.ping(T0 + 10)
    while play.queue:
        play.step(None)
    record = json.loads(play.store.objects[record_key("job", 1)])
    assert record["included"] == [] and [e["client"] for e in record["excluded"]] == ["a"]
    assert play.store.objects[model_key("job", 1)] == play.store.objects[model_key("job", 0)]


@settings(deadline=None)
@given(
    budget_mib=st.integers(1, 4096),
    n=st.integers(1, 20_000),
    params=st.integers(1, 10**8),
    strategy=st.sampled_from(["median", "trimmed-mean", "krum"]),
)
def test_the_shard_matrix_respects_the_memory_budget(
    budget_mib: int, n: int, params: int, strategy: str
) -> None:
    spec = JobSpec(
        JOB,
        (TensorSpec("w", "F32", (params,)),),
        strategy=strategy,
        memory_budget=budget_mib << 20,
        min_clients=3,
    )
    sealed = Seal(1, tuple(f"c{i}" for i in range(n)), 1, "quorum", 0.0)
    lay = shards.layout(spec, sealed)
    fixed = shards.KRUM_MATRICES * n * n * 8 if strategy == "krum" else 0
    per_column = n * 8 * shards.WORKING_COPIES
    assert 1 <= lay.width <= params
    if lay.width > 1:  # the budget holds the working copies (and Krum's N x N matrices)
        assert fixed + lay.width * per_column <= spec.memory_budget
    if lay.width < params:  # and the shard is as wide as the budget allows
        assert fixed + (lay.width + 1) * per_column > spec.memory_budget
    assert lay.count == -(-params // lay.width)
    assert lay.span(0)[0] == 0 and lay.span(lay.count - 1)[1] == params
    assert lay.span(lay.count - 1)[0] < params


def test_builders_hold_the_width_the_budget_gives(monkeypatch: pytest.MonkeyPatch) -> None:
    m0 = big_model()  # 2,050 coordinates; 1 MiB over 40 clients x 16 bytes: 1,638 a shard
    ups = updates(40, 8, m0)
    play = Play(m0, monkeypatch, rounds=1, min_clients=40, strategy="median", memory_budget=1 << 20)
    shapes: list[tuple[int, ...]] = []
    read = shards._read_rows

    def spy(*args: Any) -> Any:
        x, meta = read(*args)
        shapes.append(x.shape)
        return x, meta

    monkeypatch.setattr(shards, "_read_rows", spy)
    for c, (u, n) in ups.items():
        assert play.post(1, c, u, n) == 202
    while play.queue:
        play.step(None)
    assert sorted(shapes) == [(40, 412), (40, 1638)]
    assert max(r * w for r, w in shapes) * 8 * shards.WORKING_COPIES <= 1 << 20
    got = tensors_from_safetensors(play.store.objects[model_key("job", 1)])[0]
    assert_model(got, reference("median", {}, [u for u, _ in ups.values()], m0))
