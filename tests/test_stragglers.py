"""Async jobs from the client side and the straggler comparison: the SDK's async calls and the
torch client's async step against a real local platform, a short `microfl demo --mode async`
whose versions list every accepted update exactly once, the deterministic choice of the slow
clients, the command lines, and the report built from results."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from microfl.client import Client, ClientError, JobDone
from microfl.local.cli import build_parser
from microfl.local.demo import DemoConfig
from microfl.local.demo_clients import members, slow_clients
from microfl.local.stragglers import Curve, markdown, plan, plot


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[dict[str, Any], str]]:
    """One local platform (its own state folder and Kafka broker) for the module."""
    from microfl.local.platform import session

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MICROFL_STATE_DIR", str(tmp_path_factory.mktemp("state")))
        for name in ("MICROFL_KAFKA_BOOTSTRAP", "MICROFL_STORE", "MICROFL_SECRET"):
            mp.delenv(name, raising=False)
        with session("kafka") as (state, secret, _):
            yield state, secret


def new_job(state: dict[str, Any], model: dict[str, np.ndarray], **options: Any) -> str:
    from microfl.jobs import JobSpec, create_job
    from microfl.serde import tensors_to_safetensors
    from microfl.store import open_store

    job = f"sdk-{int(time.time() * 1e6)}"
    spec = JobSpec.for_model(job, model, created_at=time.time(), fan_in=2, **options)
    create_job(open_store(state["store"]), spec, tensors_to_safetensors(model))
    return job


def client(state: dict[str, Any], secret: str, job: str, name: str | None) -> Client:
    from microfl.tokens import issue_token

    token = issue_token(secret.encode(), job, name, admin=name is None)
    return Client(state["ingest_url"], job, token, retries=3)


def shifted(model: dict[str, np.ndarray], by: float) -> dict[str, np.ndarray]:
    return {k: (v + by).astype(v.dtype) for k, v in model.items()}


# --- the SDK against a real platform --------------------------------------------------------------


def test_sdk_posts_async_updates_and_reads_version_records(
    platform: tuple[dict[str, Any], str],
) -> None:
    state, secret = platform
    model = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    job = new_job(state, model, mode="async", buffer=2, rounds=2, max_staleness=0)
    a, b, c = (client(state, secret, job, f"c{i}") for i in range(3))
    admin = client(state, secret, job, None)
    assert a.mode() == "async" and admin.job_info()["buffer"] == 2

    first = a.post_async_update(shifted(model, 1.0), 10, base_version=0)
    assert (first["status"], first["update"], first["version_buffer"]) == ("accepted", "c0@0", 1)
    assert a.post_async_update(shifted(model, 1.0), 10, base_version=0)["status"] == "replay"
    with pytest.raises(ClientError) as refused:
        a.post_async_update(shifted(model, 1.0), 10, base_version=3)
    assert (refused.value.status, refused.value.body["error"]) == (409, "stale")
    assert admin.version(1)["state"] == "filling"

    assert b.post_trained(shifted(model, 3.0), 30, trained_on=0)["update"] == "c1@0"  # async call
    admin.wait_for_version(1, timeout=60)
    record = admin.record(1)
    assert record["included"] == ["c0@0", "c1@0"] and record["staleness"] == {"c0@0": 0, "c1@0": 0}
    tensors, version = admin.model()
    assert version == 1
    np.testing.assert_allclose(tensors["w"], 2.5)  # (10 x 1 + 30 x 3) / 40
    with pytest.raises(ClientError) as stale:  # version 1 is out: base 0 is one too old
        c.post_async_update(shifted(model, 5.0), 5, base_version=0)
    assert (stale.value.status, stale.value.body["error"]) == (409, "stale")

    sync_job = new_job(state, model, rounds=1, min_clients=1)
    s = client(state, secret, sync_job, "s0")
    assert s.post_trained(shifted(model, 1.0), 1, trained_on=0)["status"] == "accepted"  # round 1
    s.wait_for_version(1, timeout=60)
    assert s.mode() == "sync" and s.record(1)["included"] == ["s0"]
    with pytest.raises(JobDone):
        s.wait_for_version(2, timeout=60)


def test_torch_client_retrains_after_a_stale_refusal(platform: tuple[dict[str, Any], str]) -> None:
    from microfl.client.torch import TorchClient, mlp, tensors_from_module

    state, secret = platform
    torch_model = tensors_from_module(mlp())
    job = new_job(state, torch_model, mode="async", buffer=1, rounds=3, max_staleness=0)
    other = client(state, secret, job, "other")
    moved = []

    def meanwhile(base: Any, trained: Any, n: int) -> tuple[dict[str, np.ndarray], int]:
        if not moved:  # while the first training ran, version 1 was made from another update
            other.post_async_update(shifted(torch_model, 0.01), 5, base_version=0)
            other.wait_for_version(1, timeout=60)
            moved.append(True)
        return dict(trained), n

    rng = np.random.default_rng(0)
    x, y = rng.random((20, 64), dtype=np.float32), rng.integers(0, 10, 20)
    tc = TorchClient(client(state, secret, job, "torch"), mlp())
    answer = tc.run_async(x, y, epochs=1, lr=0.1, tamper=meanwhile)
    assert (answer["stale_retries"], answer["base_version"], answer["status"]) == (1, 1, "accepted")
    assert tc.last_base == 1
    tc.client.wait_for_version(2, timeout=60)  # K = 1: its update made version 2
    assert tc.run_async(x, y, epochs=1, lr=0.1)["base_version"] == 2  # waited for version 2
    tc.client.wait_for_version(3, timeout=60)
    with pytest.raises(JobDone):
        tc.run_async(x, y, epochs=1, lr=0.1)


# --- the async demo ------------------------------------------------------------------------------


def test_async_demo_versions_list_every_accepted_update_once(
    platform: tuple[dict[str, Any], str], tmp_path: Path
) -> None:
    from microfl.local.demo import train_on

    state, secret = platform
    config = DemoConfig(clients=4, rounds=2, mode="async", buffer=3, epochs=1, processes=1,
                        fan_in=2, baseline=False, slow_fraction=0.25, slowdown=2.0,
                        report=tmp_path)
    result = train_on(config, state, secret, None)

    assert [row["version"] for row in result.rows] == [1, 2]
    assert all(0 <= row["accuracy"] <= 1 and row["elapsed"] > 0 for row in result.rows)
    assert all(set(row["client_metrics"]) == {"loss", "accuracy"} for row in result.rows)
    accepted = [uid for c in result.clients for uid in c["accepted"]]
    listed = []
    for v in (1, 2):
        record = json.loads((tmp_path / f"version-{v:03d}.json").read_text())
        assert record["state"] == "committed" and record["void_slots"] == 0
        listed += record["included"] + [e["update"] for e in record["excluded"]]
    assert len(listed) == len(set(listed)) == 6, "K = 3 updates per version, each listed once"
    assert sorted(listed) == sorted(accepted), "every 202'd update is in exactly one version"
    assert len(set(result.model_sha256)) == 3
    assert json.loads((tmp_path / "metrics.json").read_text())["clients"] == result.clients
    assert (tmp_path / "accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- stragglers: choice, plan, command lines, report ---------------------------------------------


def test_stragglers_are_chosen_deterministically_and_spread_out() -> None:
    assert slow_clients(20, 0.25) == (0, 4, 8, 12, 16)
    assert slow_clients(20, 0.25) == slow_clients(20, 0.25)
    assert slow_clients(20, 0.0) == ()
    assert slow_clients(10, 0.3) == (0, 3, 6)
    assert slow_clients(4, 1.0) == (0, 1, 2, 3)
    with pytest.raises(ValueError, match="between 0 and 1"):
        slow_clients(4, 1.5)
    config = DemoConfig(clients=6, processes=4, slow_fraction=0.5, slowdown=3.0, step_time=0.5)
    groups = members(config, [f"t{i}" for i in range(6)], range(0), None)
    assert [[m.index for m in g] for g in groups] == [[0, 3], [2, 5], [4], [1]]  # slow spread
    assert {m.step_time for g in groups for m in g} == {0.5}
    assert {m.index: m.slowdown for g in groups for m in g} == {
        0: 3.0, 1: 1.0, 2: 3.0, 3: 1.0, 4: 3.0, 5: 1.0
    }


@pytest.mark.parametrize(("threads", "r", "most"), [(3, 1, 3), (0, 1, 10), (3, None, 10)])
def test_a_sync_round_trains_at_most_threads_clients_at_once(
    monkeypatch: pytest.MonkeyPatch, threads: int, r: int | None, most: int
) -> None:
    """A thousand users on two cores: a process trains `threads` of its group at a time in a
    sync round; async members all run (each keeps posting until the job ends)."""
    import threading

    from microfl.local import demo_clients

    running, seen, full = [0], [0], threading.Condition()

    def step(*_: Any) -> dict[str, Any]:  # waits (at most 5 s) until `most` run at once
        with full:
            running[0] += 1
            seen[0] = max(seen[0], running[0])
            full.notify_all()
            full.wait_for(lambda: seen[0] >= most, timeout=5)
            running[0] -= 1
        return {}

    monkeypatch.setattr(demo_clients, "_round" if r else "_versions", step)
    config = DemoConfig(clients=10, processes=1, threads=threads)
    group = members(config, [f"t{i}" for i in range(10)], range(0), None)[0]
    assert len(demo_clients.run_clients("url", "job", group, config, r)) == 10
    assert seen[0] == most


def test_plan_gives_both_modes_the_same_number_of_updates() -> None:
    sync, asynchronous = plan(DemoConfig(clients=20, rounds=10, slow_fraction=0.25, slowdown=5))
    assert (sync.mode, sync.rounds, sync.buffer) == ("sync", 10, 0)
    assert (asynchronous.mode, asynchronous.k, asynchronous.rounds) == ("async", 10, 20)
    assert asynchronous.slow_fraction == sync.slow_fraction == 0.25
    assert plan(DemoConfig(clients=20, rounds=10, buffer=5))[1].rounds == 40


def test_command_lines() -> None:
    args = build_parser().parse_args(
        ["stragglers", "--clients", "8", "--slow-fraction", "0.5", "--slowdown", "3"]
    )
    assert (args.clients, args.slow_fraction, args.slowdown, args.buffer) == (8, 0.5, 3.0, 0)
    assert args.step_time == 1.0
    assert args.report == Path("load/results/stragglers")
    args = build_parser().parse_args(["demo", "--mode", "async", "--buffer", "4",
                                      "--max-staleness", "3"])
    assert (args.mode, args.buffer, args.max_staleness, args.slowdown) == ("async", 4, 3, 1.0)


def test_report_table_and_plot(tmp_path: Path) -> None:
    base = DemoConfig(clients=20, rounds=3, slow_fraction=0.25, slowdown=5)
    sync = Curve("sync", "j1", [10.0, 20.0, 30.0], [0.7, 0.91, 0.95], 60, 0)
    asynchronous = Curve("async", "j2", [2.0, 4.0, 6.0, 8.0, 10.0, 12.0],
                         [0.5, 0.8, 0.9, 0.93, 0.94, 0.948], 60, 3)
    assert (sync.time_to(), asynchronous.time_to(), asynchronous.time_to(0.99)) == (20.0, 6.0, None)
    table = markdown(base, [sync, asynchronous], 90.0)
    assert "| sync | 60 | 20.0 | 0.950 | 30.0 | 0 |" in table
    assert "| async | 60 | 6.0 | 0.948 | 12.0 | 3 |" in table
    assert "async reached 90% 3.33x sooner than sync" in table
    assert "async - sync: -0.2 points" in table
    assert "clients 0, 4, 8, 12, 16" in table and "5x as long" in table
    never = Curve("async", "j3", [5.0], [0.4], 10, 0)
    assert "not reached" in markdown(base, [sync, never], 1.0)
    assert "did not reach 90%" in markdown(base, [sync, never], 1.0)
    plot(tmp_path / "a.png", base, [sync, asynchronous, never])
    assert (tmp_path / "a.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
