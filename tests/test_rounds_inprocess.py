"""Whole rounds driven in-process: the three functions through functions-framework's test
client, a FileStore in tmp_path, a MemoryBus whose events the test delivers by hand (in order,
shuffled, twice, or not at all) and a fake clock for deadlines and the recovery sweep."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from functions_framework import create_app

from microfl import events, handlers
from microfl.backends import Backends
from microfl.bus import MemoryBus
from microfl.finalize import RESEND_AFTER
from microfl.jobs import JobSpec, create_job, model_key, optimizer_key
from microfl.local.invariants import check_job
from microfl.rounds import record_key, seal_key, update_key
from microfl.serde import Event, event_to_http, tensors_from_safetensors, tensors_to_safetensors
from microfl.store import FileStore
from microfl.tokens import issue_token

MAIN = str(Path(__file__).resolve().parents[1] / "functions" / "main.py")
SECRET = b"in-process-test-secret-0123456789-abcdef"
T0 = 1_767_225_600.0  # 2026-01-01T00:00:00Z
JOB = "job-1"

Tensors = dict[str, np.ndarray]


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def apps() -> dict[str, Any]:
    return {name: create_app(name, MAIN).test_client()
            for name in ("ingest", "aggregate", "finalize")}


@pytest.fixture(autouse=True)
def reset_backends() -> Iterator[None]:
    yield
    handlers.set_backends(None)


class Platform:
    """One store, one bus, one clock; the functions answer through the test clients."""

    def __init__(self, root: Path, apps: dict[str, Any], now: float = T0 + 1) -> None:
        self.clock = FakeClock(now)
        self.bus = MemoryBus()
        self.store = FileStore(root)
        self.b = Backends(self.store, self.bus, SECRET, self.clock)
        self.apps = apps
        self.committed: list[Event] = []  # round.committed, as observers would see them
        self.activate()

    def activate(self) -> None:
        handlers.set_backends(self.b)

    def create(self, model: Tensors, **options: Any) -> JobSpec:
        spec = JobSpec.for_model(JOB, model, created_at=T0, **options)
        create_job(self.store, spec, tensors_to_safetensors(model))
        return spec

    def token(self, client: str | None = None, admin: bool = False) -> str:
        return issue_token(SECRET, JOB, client, admin=admin, now=self.clock())

    def post(self, r: int, client: str, body: bytes) -> tuple[int, dict]:
        resp = self.apps["ingest"].post(f"/v1/jobs/{JOB}/rounds/{r}/updates", data=body,
                                        headers={"Authorization": f"Bearer {self.token(client)}"})
        return resp.status_code, resp.get_json()

    def get(self, path: str) -> dict:
        resp = self.apps["ingest"].get(f"/v1/jobs/{JOB}{path}", headers={
            "Authorization": f"Bearer {self.token(admin=True)}"})
        assert resp.status_code == 200, resp.get_json()
        return resp.get_json()

    def take(self) -> list[tuple[str, Event]]:
        """Events published since the last take; round.committed goes to the observers."""
        out = []
        for topic, event, key in self.bus.events:
            assert key == JOB
            if topic == "microfl.rounds":
                self.committed.append(event)
            else:
                out.append((topic, event))
        self.bus.events.clear()
        return out

    def deliver(self, topic: str, event: Event) -> None:
        target = {"microfl.aggregate": "aggregate", "microfl.finalize": "finalize"}[topic]
        headers, body = event_to_http(event)
        resp = self.apps[target].post("/", data=body, headers=headers)
        assert resp.status_code == 200, (event, resp.get_json())

    def drain(self) -> int:
        """Deliver every event once, first published first delivered, until none is left."""
        queue = self.take()
        delivered = 0
        while queue:
            self.deliver(*queue.pop(0))
            delivered += 1
            queue += self.take()
        return delivered

    def ping(self, at: float) -> None:
        self.clock.now = at
        event = Event(events.PING, "/apis/v1/namespaces/microfl/pingsources/sweep",
                      f"ping-{at}")
        headers, body = event_to_http(event)
        resp = self.apps["finalize"].post("/", data=body, headers=headers)
        assert resp.status_code == 200, resp.get_json()

    def model(self, version: int) -> Tensors:
        data = self.store.read(model_key(JOB, version))
        assert data is not None, f"model version {version} is missing"
        return tensors_from_safetensors(data)[0]

    def record(self, r: int) -> dict | None:
        data = self.store.read(record_key(JOB, r))
        return None if data is None else json.loads(data)

    def snapshot(self) -> dict[str, bytes]:
        """Every stored result: updates, models, optimiser states, seals and records (not the
        tree's slots, claims, requests and nodes, whose layout follows the arrival order); seal
        and record without their wall-clock fields, the seal also without the id of whichever
        event sealed it and where its slots ended."""
        out = {}
        for key in self.store.list("jobs/"):
            if any(f"/{part}/" in key for part in ("slots", "claims", "requests", "nodes")):
                continue
            data = self.store.read(key)
            assert data is not None
            if key.endswith("/seal.json"):
                doc = json.loads(data)
                del doc["sealed_at"], doc["trigger"], doc["slots"], doc["tail"]
                data = json.dumps(doc, sort_keys=True).encode()
            elif key.endswith("/record.json"):
                doc = json.loads(data)
                del doc["committed_at"]
                data = json.dumps(doc, sort_keys=True).encode()
            out[key] = data
        return out


def initial_model(seed: int = 0) -> Tensors:
    rng = np.random.default_rng(seed)
    return {"fc.weight": rng.standard_normal((6, 5)).astype(np.float32),
            "fc.bias": rng.standard_normal(5).astype(np.float32),
            "scale": np.array([1.5], np.float64),
            "steps": np.array([10, 20], np.int64)}


def client_updates(model: Tensors, clients: list[str], seed: int) -> dict[str, tuple[Tensors, int]]:
    rng = np.random.default_rng(seed)
    out = {}
    for c in clients:
        update = {k: (v + rng.standard_normal(v.shape) * 0.5).astype(v.dtype) if v.dtype.kind == "f"
                  else v + rng.integers(-5, 6, v.shape) for k, v in model.items()}
        out[c] = (update, int(rng.integers(1, 500)))
    return out


def body(update: Tensors, n: int) -> bytes:
    return tensors_to_safetensors(update, {"num_examples": str(n)})


def weighted_mean(updates: list[tuple[Tensors, int]]) -> dict[str, np.ndarray]:
    total = float(sum(n for _, n in updates))
    names = updates[0][0]
    return {k: sum(u[k].astype(np.float64) * n for u, n in updates) / total for k in names}


def assert_fedavg_model(got: Tensors, updates: list[tuple[Tensors, int]], like: Tensors) -> None:
    mean = weighted_mean(updates)
    for k, arr in like.items():
        assert got[k].dtype == arr.dtype and got[k].shape == arr.shape, k
        if arr.dtype.kind == "f":
            np.testing.assert_allclose(got[k], mean[k].astype(arr.dtype), rtol=1e-6, atol=1e-6)
        else:
            np.testing.assert_array_equal(got[k], np.rint(mean[k]).astype(arr.dtype))


# --- (a) shuffled, duplicated delivery commits what in-order delivery commits -------------------

ROUNDS = 2


def run_rounds(platform: Platform, plan: list[dict[str, tuple[Tensors, int]]],
               rng: random.Random | None) -> None:
    """Post each round's updates and deliver its events. With rng: posts interleaved with
    deliveries at random, a few replays, and every event delivered twice in random order."""
    for r, updates in enumerate(plan, start=1):
        posts = [(c, body(u, n)) for c, (u, n) in updates.items()]
        if rng is None:
            for c, data in posts:
                assert platform.post(r, c, data)[0] == 202
            platform.drain()
        else:
            rng.shuffle(posts)
            replays = rng.sample(posts, k=3)
            pending: list[tuple[str, Event]] = []
            seen = set()
            while posts or pending:
                if posts and (not pending or rng.random() < 0.3):
                    c, data = posts.pop()
                    status, answer = platform.post(r, c, data)
                    assert (status, answer["status"]) == ((200, "replay") if c in seen
                                                          else (202, "accepted")), answer
                    seen.add(c)
                    if (c, data) in replays:  # post it again later
                        replays.remove((c, data))
                        posts.insert(rng.randrange(len(posts) + 1), (c, data))
                else:
                    topic, event = pending.pop(rng.randrange(len(pending)))
                    platform.deliver(topic, event)
                    platform.deliver(topic, event)
                pending += platform.take()
        record = platform.record(r)
        assert record is not None, f"round {r} did not commit"


@pytest.mark.parametrize("fan_in", [1, 3, 50])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shuffled_duplicated_delivery_commits_the_same_bytes(
        tmp_path: Path, apps: dict[str, Any], fan_in: int, seed: int) -> None:
    rng = random.Random(seed * 100 + fan_in)
    n_clients = rng.randint(7, 20)
    model = initial_model(seed)
    plan = [client_updates(model, [f"client-{i:02d}" for i in rng.sample(range(40), n_clients)],
                           seed * 10 + r) for r in range(ROUNDS)]

    reference = Platform(tmp_path / "in-order", apps)
    reference.create(model, rounds=ROUNDS, min_clients=n_clients, fan_in=fan_in)
    run_rounds(reference, plan, None)
    expected = reference.snapshot()

    shuffled = Platform(tmp_path / "shuffled", apps)
    shuffled.create(model, rounds=ROUNDS, min_clients=n_clients, fan_in=fan_in)
    run_rounds(shuffled, plan, rng)
    got = shuffled.snapshot()

    assert sorted(got) == sorted(expected)
    assert [k for k in expected if got[k] != expected[k]] == []
    # the snapshot holds what the test claims it compares, and the trees are sound
    for r in range(1, ROUNDS + 1):
        assert json.loads(got[seal_key(JOB, r)])["clients"] == sorted(plan[r - 1])
    for p in (reference, shuffled):
        accepted = {(r, c) for r in (1, 2) for c in plan[r - 1]}
        verdict = check_job(p.store, JOB, accepted)
        assert verdict.ok, verdict
    # each round announced exactly once however often its events were delivered
    for p in (reference, shuffled):
        assert sorted(e.data["round"] for e in p.committed) == list(range(1, ROUNDS + 1))

    # and the bytes are the right ones: round 1 is the weighted mean of its updates, once each
    assert_fedavg_model(shuffled.model(1), list(plan[0].values()), model)
    record = shuffled.record(1)
    assert record is not None
    assert record["included"] == sorted(plan[0])
    assert record["num_examples"] == sum(n for _, n in plan[0].values())
    assert record["excluded"] == []
    assert record["examples"] == {c: n for c, (_, n) in plan[0].items()}


def test_snapshot_comparison_sees_a_different_update(tmp_path: Path,
                                                     apps: dict[str, Any]) -> None:
    """Guard: one changed weight in one update makes the stored results differ."""
    model = initial_model(5)
    plan = [client_updates(model, [f"c{i}" for i in range(7)], 5)]
    snapshots = []
    for name, tweak in (("a", 0), ("b", 1)):
        u, n = plan[0]["c3"]
        variant = [{**plan[0], "c3": (u, n + tweak)}]
        p = Platform(tmp_path / name, apps)
        p.create(model, rounds=1, min_clients=7, fan_in=3)
        run_rounds(p, variant, None)
        snapshots.append(p.snapshot())
    differing = sorted(k for k in snapshots[0] if snapshots[0][k] != snapshots[1][k])
    assert model_key(JOB, 1) in differing and update_key(JOB, 1, "c3") in differing
    assert model_key(JOB, 1) in differing


# --- (b) FedAdam over two rounds ----------------------------------------------------------------

def test_fedadam_job_commits_the_reference_models(tmp_path: Path, apps: dict[str, Any]) -> None:
    opts = {"lr": 0.05, "beta1": 0.8, "beta2": 0.95, "tau": 1e-3}
    model = initial_model(11)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=2, min_clients=5, fan_in=2, strategy="fedadam",
             strategy_options=opts)
    current = {k: v.copy() for k, v in model.items()}
    m: dict[str, np.ndarray] = {}
    v: dict[str, np.ndarray] = {}
    for r in (1, 2):
        updates = client_updates(current, [f"c{i}" for i in range(5)], 100 + r)
        for c, (u, n) in updates.items():
            assert p.post(r, c, body(u, n))[0] == 202
        p.drain()
        mean = weighted_mean(list(updates.values()))
        expected = {}
        for k, x in current.items():  # Reddi et al. 2021, FedAdam, in float64
            if x.dtype.kind != "f":
                expected[k] = np.rint(mean[k]).astype(x.dtype)
                continue
            delta = mean[k] - x.astype(np.float64)
            m[k] = opts["beta1"] * m.get(k, 0.0) + (1 - opts["beta1"]) * delta
            v[k] = opts["beta2"] * v.get(k, 0.0) + (1 - opts["beta2"]) * delta ** 2
            expected[k] = (x.astype(np.float64)
                           + opts["lr"] * m[k] / (np.sqrt(v[k]) + opts["tau"])).astype(x.dtype)
        got = p.model(r)
        assert sorted(got) == sorted(expected)
        for k in expected:
            assert got[k].dtype == expected[k].dtype, k
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-6, atol=1e-7, err_msg=k)
        # not simply the mean (FedAvg) nor the old model
        assert not np.allclose(got["fc.weight"], mean["fc.weight"], atol=1e-3)
        assert not np.allclose(got["fc.weight"], current["fc.weight"], atol=1e-4)
        state_bytes = p.store.read(optimizer_key(JOB, r))
        assert state_bytes is not None
        state = tensors_from_safetensors(state_bytes)[0]
        for k in m:
            np.testing.assert_allclose(state[f"m/{k}"], m[k], rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(state[f"v/{k}"], v[k], rtol=1e-9, atol=1e-15)
        record = p.record(r)
        assert record is not None and record["strategy"] == "fedadam"
        assert record["included"] == sorted(updates)
        current = got
    assert p.get("")["state"] == "done"


# --- (c) deadline sealing by the ping -----------------------------------------------------------

def test_deadline_seals_a_round_short_of_quorum(tmp_path: Path, apps: dict[str, Any]) -> None:
    model = initial_model(3)
    p = Platform(tmp_path, apps, now=T0 + 1)
    p.create(model, rounds=2, min_clients=10, round_timeout=5, fan_in=2)
    updates = client_updates(model, ["a", "b", "c"], 3)
    for c, (u, n) in updates.items():
        assert p.post(1, c, body(u, n))[0] == 202
    p.drain()
    assert p.store.read(seal_key(JOB, 1)) is None  # 3 of 10, deadline not reached
    p.ping(T0 + 4.9)
    assert p.drain() == 0 and p.store.read(seal_key(JOB, 1)) is None
    assert p.get("/rounds/1")["state"] == "open"

    p.ping(T0 + 5.5)
    assert p.drain() > 0
    seal = json.loads(p.store.read(seal_key(JOB, 1)) or b"{}")
    assert (seal["reason"], seal["clients"], seal["sealed_at"]) == ("deadline", ["a", "b", "c"],
                                                                     T0 + 5.5)
    record = p.record(1)
    assert record is not None
    assert record["sealed_reason"] == "deadline"
    assert record["included"] == ["a", "b", "c"]
    assert record["num_examples"] == sum(n for _, n in updates.values())
    assert_fedavg_model(p.model(1), list(updates.values()), model)
    assert [e.data["round"] for e in p.committed] == [1]

    # round 2 opens when round 1 committed: its deadline counts from then, not from the job
    opened = record["committed_at"]
    assert opened == T0 + 5.5
    p.clock.now = opened + 1
    late = client_updates(p.model(1), ["d"], 4)
    assert p.post(2, "d", body(*late["d"]))[0] == 202
    p.drain()
    p.ping(opened + 4.9)
    assert p.drain() == 0 and p.store.read(seal_key(JOB, 2)) is None
    p.ping(opened + 5.5)
    p.drain()
    seal2 = json.loads(p.store.read(seal_key(JOB, 2)) or b"{}")
    assert (seal2["reason"], seal2["clients"]) == ("deadline", ["d"])
    record2 = p.record(2)
    assert record2 is not None and record2["included"] == ["d"]
    assert_fedavg_model(p.model(2), list(late.values()), model)
    assert [e.data["round"] for e in p.committed] == [1, 2]


def test_deadline_without_updates_seals_nothing(tmp_path: Path, apps: dict[str, Any]) -> None:
    p = Platform(tmp_path, apps)
    p.create(initial_model(), rounds=1, min_clients=2, round_timeout=5)
    for at in (T0 + 6, T0 + 600):
        p.ping(at)
        assert p.take() == [] and p.store.read(seal_key(JOB, 1)) is None
    assert p.get("/rounds/1") == {"round": 1, "state": "open", "included": [], "excluded": [],
                                  "received": 0}
    # an update after the deadline is sealed in by the next ping (uploads that neither fill a
    # leaf nor may complete the quorum announce nothing)
    update = client_updates(initial_model(), ["a"], 1)
    assert p.post(1, "a", body(*update["a"]))[0] == 202
    p.drain()
    p.ping(T0 + 601)
    p.drain()
    record = p.record(1)
    assert record is not None
    assert (record["sealed_reason"], record["included"]) == ("deadline", ["a"])


# --- (d) lost events are recovered by the sweep --------------------------------------------------

@pytest.mark.parametrize("lost", ["all partial.requested", "some partial.requested",
                                  "all partial.ready"])
def test_sweep_recovers_lost_events(tmp_path: Path, apps: dict[str, Any], lost: str) -> None:
    model = initial_model(4)
    p = Platform(tmp_path, apps, now=T0 + 1)
    p.create(model, rounds=1, min_clients=8, fan_in=3)
    updates = client_updates(model, [f"c{i}" for i in range(8)], 4)
    for c, (u, n) in updates.items():
        assert p.post(1, c, body(u, n))[0] == 202

    lost_type = events.PARTIAL_READY if lost.endswith("ready") else events.PARTIAL_REQUESTED
    dropped = []
    queue = p.take()
    while queue:
        topic, event = queue.pop(0)
        if event.type == lost_type and (not lost.startswith("some") or event.data["node"] != 1):
            dropped.append(event)
            continue
        p.deliver(topic, event)
        queue += p.take()
    assert len(dropped) == (2 if lost.startswith("some") else 3)  # 8 updates, fan_in 3
    assert p.record(1) is None
    sealed_at = json.loads(p.store.read(seal_key(JOB, 1)) or b"{}")["sealed_at"]
    assert sealed_at == T0 + 1

    p.ping(sealed_at + RESEND_AFTER - 1)  # too early to resend a request: nothing happens
    assert p.take() == []
    if lost_type == events.PARTIAL_REQUESTED:
        assert p.record(1) is None
        p.ping(sealed_at + RESEND_AFTER + 1)
        resent = p.take()
        assert sorted(e.data["node"] for _, e in resent) == sorted(
            e.data["node"] for e in dropped)
        p.bus.events.extend((t, e, JOB) for t, e in resent)
        p.drain()
    # else every node is there: the first sweep commits, announcing the round itself
    record = p.record(1)
    assert record is not None
    assert record["included"] == sorted(updates)
    assert_fedavg_model(p.model(1), list(updates.values()), model)
    assert [e.data["round"] for e in p.committed] == [1]

    p.ping(sealed_at + 3 * RESEND_AFTER)  # a committed round is left alone
    assert p.take() == []
    assert [e.data["round"] for e in p.committed] == [1]


# --- (e) updates after the seal ------------------------------------------------------------------

def test_updates_after_the_seal_are_refused_and_in_no_record(
        tmp_path: Path, apps: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    model = initial_model(6)
    p = Platform(tmp_path, apps)
    p.create(model, rounds=2, min_clients=3, fan_in=2)
    clients = [f"c{i}" for i in range(9)]
    ups = client_updates(model, clients, 6)
    for c in clients[:3]:
        assert p.post(1, c, body(*ups[c]))[0] == 202
    # deliver only the finalize events: round 1 is sealed, its partials not yet computed
    for topic, event in p.take():
        if topic == "microfl.finalize":
            p.deliver(topic, event)
    assert p.get("/rounds/1")["state"] == "sealed"

    status, answer = p.post(1, "c3", body(*ups["c3"]))
    assert (status, answer["error"]) == (409, "round_not_open")
    assert p.store.read(update_key(JOB, 1, "c3")) is None
    assert p.post(1, "c0", body(*ups["c0"]))[0] == 200  # a replay of a sealed-in update is fine
    status, answer = p.post(1, "c0", body(*ups["c1"]))
    assert (status, answer["error"]) == (409, "conflicting_update")

    # the race: the open check passed just before the seal, the write landed just after it
    monkeypatch.setattr("microfl.rounds.Rounds.require_open", lambda *args: None)
    status, answer = p.post(1, "c4", body(*ups["c4"]))
    assert (status, answer["error"]) == (409, "round_not_open")
    assert p.store.read(update_key(JOB, 1, "c4")) is None
    monkeypatch.undo()
    # and its instance died before it could remove the object: the record says so
    p.store.create(update_key(JOB, 1, "c5"), body(*ups["c5"]))

    p.drain()
    record1 = p.record(1)
    assert record1 is not None
    assert record1["included"] == ["c0", "c1", "c2"]
    assert record1["excluded"] == [{"client": "c5", "reason": "arrived after round 1 was sealed"}]
    assert_fedavg_model(p.model(1), [ups[c] for c in ("c0", "c1", "c2")], model)

    status, answer = p.post(1, "c6", body(*ups["c6"]))  # round 1 committed
    assert (status, answer["error"]) == (409, "round_not_open")
    for c in ("c7", "c8", "c6"):
        assert p.post(2, c, body(*ups[c]))[0] == 202
    p.drain()
    status, answer = p.post(2, "c3", body(*ups["c3"]))  # the job is done
    assert (status, answer["error"]) == (409, "round_not_open")

    records = [p.record(r) for r in (1, 2)]
    assert records[1] is not None and records[1]["included"] == ["c6", "c7", "c8"]
    included = [c for rec in records if rec for c in rec["included"]]
    for late in ("c3", "c4", "c5"):
        assert late not in included
    assert sorted(included) == ["c0", "c1", "c2", "c6", "c7", "c8"]


def test_lost_record_does_not_shorten_the_next_rounds_deadline(tmp_path: Path,
                                                               apps: dict[str, Any]) -> None:
    """finalize died after writing model 1 and before writing record 1 (the record holds the
    time round 2 opened). Model 1 is published, so a client posts to round 2 at once; the
    update event must not seal round 2 by "deadline" on the strength of the job's creation
    time: round 2 has been open for a second, far from its 300 s deadline and quorum of 3."""
    model = initial_model(8)
    p = Platform(tmp_path, apps, now=T0 + 1)
    p.create(model, rounds=2, min_clients=3, round_timeout=300, fan_in=2)
    p.clock.now = T0 + 1000  # round 1 took a while to reach quorum
    ups = client_updates(model, ["a", "b", "c", "d"], 8)
    for c in ("a", "b", "c"):
        assert p.post(1, c, body(*ups[c]))[0] == 202
    p.drain()
    record_path = tmp_path / record_key(JOB, 1)
    record_path.unlink()  # as if never written
    assert p.get("")["open_round"] == 2  # model 1 exists: round 2 is open

    p.clock.now = T0 + 1001
    assert p.post(2, "d", body(*ups["d"]))[0] == 202
    p.drain()
    assert p.store.read(seal_key(JOB, 2)) is None, json.loads(
        p.store.read(seal_key(JOB, 2)) or b"{}")
