"""Property: whatever the arrival order, duplicated or lost events, crashes at failpoints and the
moment of the seal, a round commits the same model bytes as a fault-free run over the same
included updates with another tree shape, within 1e-6 of exact FedAvg, and every 2xx upload is
in exactly one leaf."""

from __future__ import annotations

import json
import random
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl import healthy_run
from microfl import faults, finalize
from microfl.jobs import create_job, model_key
from microfl.local.invariants import check_job
from microfl.rounds import update_key
from microfl.store import FileStore
from treeplay import T0, Play

FAILPOINTS = [n for n in faults.FAILPOINTS if not n.startswith("jobs.")]


def model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "b": rng.standard_normal(4).astype(np.float64),
    }


def updates(n: int, seed: int) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    base = model()
    return {
        f"c{i:02d}": (
            {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in base.items()},
            int(rng.integers(1, 1000)),
        )
        for i in range(n)
    }


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    n=st.integers(2, 14),
    fan_in=st.integers(1, 4),
    other_fan_in=st.integers(1, 5),
    quorum=st.floats(0.3, 1.0),
    seed=st.integers(0, 2**32 - 1),
    crashes=st.lists(st.tuples(st.sampled_from(FAILPOINTS), st.integers(1, 3)), max_size=4),
    drop=st.sampled_from([0.0, 0.1, 0.3]),
    dup=st.sampled_from([0.0, 0.3]),
)
def test_any_history_commits_the_bytes_of_the_included_set(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path_factory: pytest.TempPathFactory,
    n: int,
    fan_in: int,
    other_fan_in: int,
    quorum: float,
    seed: int,
    crashes: list[tuple[str, int]],
    drop: float,
    dup: float,
) -> None:
    rng = random.Random(seed)
    ups = updates(n, seed % 1000)
    with monkeypatch.context() as mp:
        play = Play(
            model(),
            mp,
            rounds=1,
            min_clients=max(1, int(n * quorum)),
            fan_in=fan_in,
            round_timeout=30.0,
        )
        play.armed = dict(crashes)
        order = list(ups)
        rng.shuffle(order)
        answered: dict[str, int] = {}
        while order or play.queue:
            if order and (not play.queue or rng.random() < 0.5):
                c = order.pop(0)
                status = play.post(1, c, *ups[c])
                if status in (0, 503):  # the client retries later
                    order.insert(rng.randrange(len(order) + 1), c)
                elif status in (200, 202) or answered.get(c) not in (200, 202):
                    answered[c] = status
            else:
                play.step(rng, drop, dup)
        t = T0 + 1
        for _ in range(40):  # the sweep runs until the round commits; events still flow
            if play.store.exists("jobs/job/rounds/00000001/record.json"):
                break
            t += finalize.RESEND_AFTER * 4
            play.ping(t)
            while play.queue:
                play.step(rng, drop / 2, dup)
        ok = sorted(c for c, s in answered.items() if s in (200, 202))
        record = play.store.objects.get("jobs/job/rounds/00000001/record.json")
        assert record is not None, "the round never committed"
        verdict = check_job(play.store, "job", {(1, c) for c in ok}, slack=1e9)  # fake clock
        assert verdict.ok, verdict
        doc = json.loads(record)
        assert doc["included"] == ok and doc["excluded"] == []

    # the reference: the same included updates, no faults, another tree shape
    ref = FileStore(tmp_path_factory.mktemp("ref"))
    create_job(
        ref, replace(play.spec, fan_in=other_fan_in), play.store.objects[model_key("job", 0)]
    )
    for c in ok:
        ref.create(update_key("job", 1, c), play.store.objects[update_key("job", 1, c)])
    healthy_run(ref, "job")
    assert ref.read(model_key("job", 1)) == play.store.objects[model_key("job", 1)]
