"""Asynchronous (FedBuff) jobs in process: the HTTP contract through functions-framework's test
client, and whole jobs through the services on an in-memory store (tests/treeplay.py) with
events delivered in order, shuffled, twice or never, crashes at failpoints and a fake clock."""

from __future__ import annotations

import io
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fl import SECRET as FL_SECRET
from microfl import buffers, faults, finalize, ingest, versions
from microfl.buffers import Buffers, grid_base, update_id
from microfl.bus import MemoryBus
from microfl.errors import BusUnavailable, ConfigError, MicroFLError, http_error
from microfl.events import PARTIAL_REQUESTED
from microfl.exactsum import ExactSum
from microfl.jobs import JobSpec, model_key
from microfl.local.invariants import check_job
from microfl.local.reference import TOLERANCE, fedavg_error, fedbuff
from microfl.rounds import Rounds, record_key
from microfl.serde import tensors_from_safetensors, tensors_to_safetensors
from microfl.strategy import make_strategy
from microfl.tokens import issue_token
from test_rounds_inprocess import JOB, Platform, apps, initial_model  # noqa: F401  (fixture)
from treeplay import T0, Crash, Play

Tensors = dict[str, np.ndarray]
ASYNC_FAILPOINTS = [n for n in faults.FAILPOINTS if not n.startswith(("jobs.", "shards."))]


def abody(update: Tensors, n: int, base: int | str | None) -> bytes:
    meta = {"num_examples": str(n)}
    if base is not None:
        meta["base_version"] = str(base)
    return tensors_to_safetensors(update, meta)


def trained(base_model: Tensors, client: str, base: int) -> tuple[Tensors, int]:
    """The update `client` sends after training on `base_model` (version `base`)."""
    rng = np.random.default_rng([sum(map(ord, client)), base])
    update = {
        k: (v + rng.standard_normal(v.shape) * 0.3).astype(v.dtype)
        if v.dtype.kind == "f"
        else v + rng.integers(-3, 4, v.shape)
        for k, v in base_model.items()
    }
    return update, int(rng.integers(1, 400))


# --- the HTTP contract -------------------------------------------------------------------------


class AsyncPlatform(Platform):
    def upload(self, client: str, data: bytes, token: str | None = None) -> tuple[int, dict]:
        resp = self.apps["ingest"].post(
            f"/v1/jobs/{JOB}/updates",
            data=data,
            headers={"Authorization": f"Bearer {token or self.token(client)}"},
        )
        return resp.status_code, resp.get_json()

    def call(self, method: str, path: str, client: str | None = None, **kw: Any) -> tuple[int, Any]:
        token = self.token(client) if client else self.token(admin=True)
        resp = getattr(self.apps["ingest"], method)(
            f"/v1/jobs/{JOB}{path}", headers={"Authorization": f"Bearer {token}"}, **kw
        )
        return resp.status_code, resp.get_json()


def test_http_contract(tmp_path: Path, apps: dict[str, Any]) -> None:  # noqa: F811
    model = initial_model(1)
    p = AsyncPlatform(tmp_path, apps)
    p.create(model, mode="async", buffer=2, rounds=2, max_staleness=1, fan_in=1)
    job = p.get("")
    assert (job["mode"], job["buffer"], job["max_staleness"], job["open_round"]) == (
        "async",
        2,
        1,
        None,
    )
    assert (job["staleness_exponent"], job["state"], job["model_version"]) == (0.5, "running", 0)

    u, n = trained(model, "a", 0)
    status, answer = p.upload("a", abody(u, n, 0))
    assert (status, answer) == (
        202,
        {
            "client": "a",
            "base_version": 0,
            "update": "a@0",
            "version_buffer": 1,
            "status": "accepted",
        },
    )
    assert p.upload("a", abody(u, n, 0)) == (200, {**answer, "status": "replay"})
    status, answer = p.upload("a", abody(u, n + 1, 0))
    assert (status, answer["error"]) == (409, "conflicting_update")
    for bad in (None, "x", "-1", "1.0"):
        status, answer = p.upload("b", abody(u, n, bad))
        assert (status, answer["error"]) == (400, "invalid_update"), bad
        assert "base_version" in answer["message"]
    status, answer = p.upload("b", abody(u, n, 1))  # version 1 does not exist yet
    assert (status, answer["error"]) == (409, "stale")
    assert "fetch version 0" in answer["message"]
    assert p.call("get", "/versions/1", "a") == (
        200,
        {"version": 1, "state": "filling", "received": 1, "buffer": 2},
    )

    # the wrong mode's endpoints point to the right ones
    status, answer = p.call("post", "/rounds/1/updates", "a", data=abody(u, n, 0))
    assert (status, answer["error"]) == (409, "wrong_mode") and "/updates" in answer["message"]
    status, answer = p.call("get", "/rounds/1", "a")
    assert (status, answer["error"]) == (404, "unknown_round")
    assert "/versions/" in answer["message"]

    u, n = trained(model, "b", 0)
    assert p.upload("b", abody(u, n, 0))[0] == 202
    p.drain()
    status, record = p.call("get", "/versions/1", "a")  # a client sees no weights
    assert status == 200 and record["included"] == ["a@0", "b@0"]
    assert record["staleness"] == {"a@0": 0, "b@0": 0} and record["state"] == "committed"
    assert "weights" not in record and "examples" not in record
    admin = p.get("/versions/1")
    assert set(admin["weights"]) == {"a@0", "b@0"} and admin["sealed_reason"] == "full"
    assert abs(sum(admin["weights"].values()) - 1.0) < 1e-12  # no staleness: FedAvg's shares

    # version 1 exists: base 0 is 1 behind (allowed), base 2 is ahead
    v1 = p.model(1)
    ua, na = trained(model, "c", 0)
    assert p.upload("c", abody(ua, na, 0))[1]["version_buffer"] == 2
    status, answer = p.upload("d", abody(ua, na, 2))
    assert (status, answer["error"]) == (409, "stale")
    ub, nb = trained(v1, "a", 1)
    assert p.upload("a", abody(ub, nb, 1))[0] == 202  # the same client, a newer base
    p.drain()
    assert p.get("")["state"] == "done"
    record2 = p.get("/versions/2")
    assert record2["included"] == ["a@1", "c@0"] and record2["staleness"] == {"a@1": 0, "c@0": 1}
    status, answer = p.upload("e", abody(*trained(p.model(2), "e", 2), 2))
    assert (status, answer["error"]) == (409, "round_not_open")
    assert p.call("get", "/versions/3", "a")[0] == 404
    verdict = check_job(p.store, JOB, {(0, "a"), (0, "b"), (0, "c"), (1, "a")})
    assert verdict.ok, verdict


def test_sync_job_refuses_the_async_endpoints(tmp_path: Path, apps: dict[str, Any]) -> None:  # noqa: F811
    p = AsyncPlatform(tmp_path, apps)
    p.create(initial_model(2), rounds=1)
    status, answer = p.upload("a", abody(*trained(initial_model(2), "a", 0), 0))
    assert (status, answer["error"]) == (409, "wrong_mode") and "/rounds/" in answer["message"]
    status, answer = p.call("get", "/versions/1")
    assert (status, answer["error"]) == (404, "unknown_round") and "/rounds/1" in answer["message"]
    assert p.get("")["mode"] == "sync" and "buffer" not in p.get("")


@pytest.mark.parametrize(
    ("options", "fix"),
    [
        ({"strategy": "median"}, "median compares whole updates"),
        ({"strategy": "krum"}, "krum compares whole updates"),
        ({"strategy": "trimmed-mean"}, "trimmed-mean compares"),
        ({"strategy": "dp-fedavg"}, "privacy accounting"),
        ({"buffer": 0}, "--buffer K"),
        ({"max_staleness": -1}, "max_staleness"),
        ({"staleness_exponent": -0.5}, "staleness_exponent"),
    ],
)
def test_async_configs_refused(options: dict[str, Any], fix: str) -> None:
    opts = {"buffer": 4, **options}
    with pytest.raises(ConfigError, match=fix):
        JobSpec.for_model("j", initial_model(), mode="async", **opts)
    with pytest.raises(ConfigError, match="async jobs"):
        JobSpec.for_model("j", initial_model(), buffer=3)


# --- whole jobs on the services ------------------------------------------------------------------


class AsyncPlay(Play):
    def __init__(self, model: Tensors, monkeypatch: pytest.MonkeyPatch, **options: Any) -> None:
        super().__init__(model, monkeypatch, mode="async", **options)
        for module in (buffers, versions):
            monkeypatch.setattr(module, "failpoint", self._failpoint)
        self.answers: dict[tuple[int, str], int] = {}

    def upload(self, client: str, base: int, data: bytes) -> tuple[int, dict]:
        token = issue_token(FL_SECRET.encode(), "job", client, now=self.clock())
        try:
            status, answer = ingest.post_async_update(
                self.b, "job", token, io.BytesIO(data).read, len(data)
            )
        except Crash:
            status, answer = 0, {}
        except MicroFLError as exc:
            status, answer = http_error(exc)
        self.take()
        if status in (200, 202) or self.answers.get((base, client)) not in (200, 202):
            self.answers[(base, client)] = status
        return status, answer

    def model(self, v: int) -> Tensors | None:
        data = self.store.objects.get(model_key("job", v))
        return None if data is None else tensors_from_safetensors(data)[0]

    def record(self, v: int) -> dict | None:
        data = self.store.objects.get(record_key("job", v))
        return None if data is None else json.loads(data)

    def progress(self, done: Any, rng: random.Random | None, drop: float, dup: float) -> None:
        """Deliver events (and, when none is left, run the sweep later and later) until done()."""
        t = self.clock.now
        for _ in range(3000):
            if done():
                return
            if self.queue:
                self.step(rng, drop, dup)
            else:
                t += finalize.RESEND_AFTER * 8
                self.ping(t)
        raise AssertionError("no progress")

    def accepted(self) -> set[tuple[int, str]]:
        return {key for key, s in self.answers.items() if s in (200, 202)}


def run_job(
    play: AsyncPlay,
    plan: list[list[tuple[str, int]]],
    rng: random.Random | None = None,
    drop: float = 0.0,
    dup: float = 0.0,
    skip: float = 0.0,
) -> None:
    """Post each buffer's (client, base) updates in order, each once model `base` exists (the
    update is trained on it), retrying until answered; events in between as `rng` decides.
    A `skip` fraction of the clients never sends (buffers then close at their deadline)."""
    for planned in plan:
        for client, base in planned:
            if rng is not None and rng.random() < skip:
                continue
            if skip:  # versions may be missing for good: train on the latest if need be
                base = min(base, Rounds(play.store, play.spec).latest_version())
            play.progress(lambda b=base: play.model(b) is not None, rng, drop, dup)
            data = abody(*trained(play.model(base) or {}, client, base), base)
            while play.upload(client, base, data)[0] in (0, 503):
                pass
            if rng is not None:
                for _ in range(rng.randrange(3)):
                    if play.queue:
                        play.step(rng, drop, dup)
    rounds = Rounds(play.store, play.spec)

    def settled() -> bool:  # every buffer that has an update is committed
        r = rounds.latest_version()
        if not (r == 0 or rounds.has_record(r)):
            return False
        return r == len(plan) or (not play.queue and not rounds.slot_exists(r + 1, 0))

    play.progress(settled if skip else lambda: play.record(len(plan)) is not None, rng, drop, dup)


def make_plan(seed: int, k: int, versions_: int, stale: int) -> list[list[tuple[str, int]]]:
    """K distinct updates per buffer; buffer r's trained on versions r-1-stale .. r-1."""
    rng = random.Random(seed)
    seen: set[tuple[str, int]] = set()
    plan = []
    for r in range(1, versions_ + 1):
        planned: list[tuple[str, int]] = []
        while len(planned) < k:
            u = (f"c{rng.randrange(30):02d}", rng.randint(max(0, r - 1 - stale), r - 1))
            if u not in seen:
                seen.add(u)
                planned.append(u)
        plan.append(planned)
    return plan


def snapshot(play: AsyncPlay) -> dict[str, bytes]:
    """Updates, claims, models, optimiser states and records (records without committed_at)."""
    out = {}
    for key, data in play.store.objects.items():
        if any(f"/{p}/" in key for p in ("slots", "requests", "nodes")) or "seal" in key:
            continue
        if key.endswith("record.json"):
            doc = json.loads(data)
            del doc["committed_at"]
            data = json.dumps(doc, sort_keys=True).encode()
        out[key] = data
    return out


def flat_model(play: AsyncPlay, r: int) -> bytes:
    """Model r as ONE leaf folds its record's included updates (in reverse order): the bytes
    every tree shape, order and fault history must give."""
    spec, rounds = play.spec, Rounds(play.store, play.spec)
    record = play.record(r)
    assert record is not None
    if not record["included"]:  # e.g. a buffer of void slots only: the model carries over
        return play.store.objects[model_key("job", r - 1)]
    grid = grid_base(rounds)
    acc = ExactSum(grid, max_weight=spec.max_examples)
    buf = Buffers(play.store, spec)
    members = []
    for uid in reversed(record["included"]):
        client, base = buffers.parse_update_id(uid)
        members.append((uid, buf.read_update(base, client)))
    buffers.fold_deltas(acc, spec, r, members, play.model, spec.options.get("clip"))
    current = play.model(r - 1) or {}
    delta = acc.finish(acc.weight)
    mean = {k: current[k].astype(np.float64) + delta[k] for k in current}
    state = play.store.objects.get(f"jobs/job/optimizer/{r - 1:08d}.safetensors")
    model, _ = make_strategy(spec.strategy, spec.strategy_options).server_update(
        current, mean, tensors_from_safetensors(state)[0] if state else None
    )
    return tensors_to_safetensors(model)


def check_against_reference(play: AsyncPlay, last: int) -> None:
    """Every version is FedBuff's (numpy, float64) within TOLERANCE; the bytes of one flat fold."""
    play.armed = {}  # no crash in the yardstick
    for r in range(1, last + 1):
        record = play.record(r)
        assert record is not None
        assert play.store.objects[model_key("job", r)] == flat_model(play, r), f"version {r}"
        if play.spec.strategy != "fedavg" or not record["included"]:
            continue
        updates = []
        for uid in record["included"]:
            client, base = buffers.parse_update_id(uid)
            data = Buffers(play.store, play.spec).read_update(base, client) or b""
            x, meta = tensors_from_safetensors(data)
            assert record["staleness"][uid] == r - 1 - base
            updates.append((x, int(meta["num_examples"]), play.model(base), r - 1 - base))
        exact = fedbuff(
            play.model(r - 1) or {},
            updates,
            play.spec.staleness_exponent,
            play.spec.options.get("clip"),
        )
        assert fedavg_error(play.model(r) or {}, exact) <= TOLERANCE, f"version {r}"


@pytest.mark.parametrize("fan_in", [1, 3, 10])
@pytest.mark.parametrize("seed", [0, 1])
def test_events_shuffled_duplicated_lost_commit_the_same_bytes(
    monkeypatch: pytest.MonkeyPatch, fan_in: int, seed: int
) -> None:
    plan = make_plan(seed, 5, 4, stale=2)
    options = dict(buffer=5, rounds=len(plan), max_staleness=2, fan_in=fan_in, round_timeout=1e9)
    ref = AsyncPlay(initial_model(seed), monkeypatch, **options)
    run_job(ref, plan)
    chaos = AsyncPlay(initial_model(seed), monkeypatch, **options)
    run_job(chaos, plan, random.Random(seed), drop=0.2, dup=0.3)
    assert snapshot(chaos) == snapshot(ref)
    for p in (ref, chaos):
        verdict = check_job(p.store, "job", p.accepted())
        assert verdict.ok, verdict
        assert sorted(
            uid for r in range(1, len(plan) + 1) for uid in p.record(r)["included"]
        ) == sorted(update_id(c, b) for planned in plan for c, b in planned)  # type: ignore[index]
    check_against_reference(chaos, len(plan))
    staleness = [t for r in range(1, len(plan) + 1) for t in chaos.record(r)["staleness"].values()]  # type: ignore[index]
    assert max(staleness) >= 1  # the plan did exercise stale updates


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    k=st.integers(1, 7),
    fan_in=st.integers(1, 4),
    seed=st.integers(0, 2**32 - 1),
    crashes=st.lists(st.tuples(st.sampled_from(ASYNC_FAILPOINTS), st.integers(1, 3)), max_size=4),
    drop=st.sampled_from([0.0, 0.2]),
    dup=st.sampled_from([0.0, 0.3]),
    strategy=st.sampled_from(["fedavg", "fedadam"]),
    timeout=st.sampled_from([1e9, 30.0]),
)
def test_crashes_lose_nothing_and_versions_are_their_sets_bytes(
    monkeypatch: pytest.MonkeyPatch,
    k: int,
    fan_in: int,
    seed: int,
    crashes: list[tuple[str, int]],
    drop: float,
    dup: float,
    strategy: str,
    timeout: float,
) -> None:
    with monkeypatch.context() as mp:
        play = AsyncPlay(
            initial_model(seed % 7),
            mp,
            buffer=k,
            rounds=3,
            max_staleness=3,
            fan_in=fan_in,
            round_timeout=timeout,
            strategy=strategy,
        )
        play.armed = dict(crashes)
        skip = 0.2 if timeout < 1e9 else 0.0  # clients that never send: deadlines close buffers
        run_job(play, make_plan(seed, k, 3, stale=2), random.Random(seed), drop, dup, skip)
        verdict = check_job(play.store, "job", play.accepted())
        assert verdict.ok, verdict
        last = Rounds(play.store, play.spec).latest_version()
        assert last == 3 or skip
        check_against_reference(play, last)
        for r in range(1, last + 1):  # a void slot is a retry that claimed elsewhere, or nothing
            record = play.record(r)
            assert record is not None
            assert len(record["included"]) + len(record["excluded"]) + record["void_slots"] == k


def test_deadline_closes_a_partial_buffer_and_a_racing_upload_moves_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = initial_model(3)
    play = AsyncPlay(model, monkeypatch, buffer=4, rounds=3, round_timeout=5.0, fan_in=3)
    for c in ("a", "b"):
        assert play.upload(c, 0, abody(*trained(model, c, 0), 0))[0] == 202
    play.progress(lambda: not play.queue, None, 0, 0)
    play.ping(T0 + 4)  # before the deadline: nothing
    assert (
        play.record(1) is None
        and play.store.objects.get("jobs/job/rounds/00000001/seal.json") is None
    )

    # the race: an upload found slot 2 free, then the sweep closed the buffer, then it creates
    first_free = Buffers._first_free
    fired: list[int] = []

    def racing(self: Buffers, r: int, low: int) -> int:
        n = first_free(self, r, low)
        if not fired:
            fired.append(n)
            play.ping(T0 + 6)  # past the deadline: void slots 2 and 3, seal
        return n

    monkeypatch.setattr(Buffers, "_first_free", racing)
    monkeypatch.setattr(Buffers, "unclaimed", lambda self, bases: [])  # listed before c's write
    status, answer = play.upload("c", 0, abody(*trained(model, "c", 0), 0))
    monkeypatch.undo()
    assert fired == [2] and (status, answer["version_buffer"]) == (202, 2)
    play.progress(lambda: play.record(1) is not None, None, 0, 0)
    record = play.record(1)
    assert record is not None
    assert (record["included"], record["void_slots"], record["sealed_reason"]) == (
        ["a@0", "b@0"],
        2,
        "deadline",
    )
    # version 2 opened when version 1 committed: c waits there, and its deadline counts from then
    play.ping(record["committed_at"] + 4)
    assert play.record(2) is None
    play.ping(record["committed_at"] + 6)
    play.progress(lambda: play.record(2) is not None, None, 0, 0)
    record2 = play.record(2)
    assert record2 is not None
    assert (record2["included"], record2["staleness"]) == (["c@0"], {"c@0": 1})
    verdict = check_job(play.store, "job", play.accepted())
    assert verdict.ok, verdict
    check_against_reference(play, 2)


def test_an_upload_that_slips_in_before_the_close_is_a_member(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = initial_model(4)
    play = AsyncPlay(model, monkeypatch, buffer=5, rounds=1, round_timeout=5.0, fan_in=2)
    assert play.upload("a", 0, abody(*trained(model, "a", 0), 0))[0] == 202
    seal = Buffers.seal

    def late(self: Buffers, r: int, now: float, trigger: str, deadline: bool = False) -> Any:
        # just before the sweep closes the buffer, another upload takes slot 1
        assert play.upload("b", 0, abody(*trained(model, "b", 0), 0))[0] == 202
        monkeypatch.setattr(Buffers, "seal", seal)
        return seal(self, r, now, trigger, deadline)

    monkeypatch.setattr(Buffers, "seal", late)
    play.ping(T0 + 10)
    play.progress(lambda: play.record(1) is not None, None, 0, 0)
    record = play.record(1)
    assert record is not None
    assert (record["included"], record["void_slots"]) == (["a@0", "b@0"], 3)
    check_against_reference(play, 1)


def test_sweep_places_an_update_whose_instance_died_before_its_slot(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = initial_model(5)
    play = AsyncPlay(model, monkeypatch, buffer=2, rounds=1, fan_in=2, round_timeout=1e9)
    play.armed = {"ingest.after_update": 1}
    assert play.upload("a", 0, abody(*trained(model, "a", 0), 0))[0] == 0  # stored, no slot
    assert play.upload("b", 0, abody(*trained(model, "b", 0), 0))[0] == 202
    assert Buffers(play.store, play.spec).claim(0, "a") is None
    play.progress(lambda: play.record(1) is not None, None, 0, 0)  # the sweep finds it
    record = play.record(1)
    assert record is not None and record["included"] == ["a@0", "b@0"]
    # a retry after that is a replay of the update in version 1
    status, answer = play.upload("a", 0, abody(*trained(model, "a", 0), 0))
    assert (status, answer["version_buffer"]) == (200, 1)


def test_a_retry_that_claims_first_voids_the_slot_it_left(monkeypatch: pytest.MonkeyPatch) -> None:
    model = initial_model(6)
    play = AsyncPlay(model, monkeypatch, buffer=3, rounds=1, fan_in=1, round_timeout=1e9)
    play.armed = {"buffers.after_slot": 1}  # slot 0 taken, no claim
    data = abody(*trained(model, "a", 0), 0)
    assert play.upload("a", 0, data)[0] == 0
    assert play.upload("a", 0, data) == (
        200,
        {
            "client": "a",
            "base_version": 0,
            "update": "a@0",
            "version_buffer": 1,
            "status": "replay",
        },
    )
    for c in ("b", "c"):
        play.upload(c, 0, abody(*trained(model, c, 0), 0))
    play.progress(lambda: play.record(1) is not None, None, 0, 0)
    record = play.record(1)
    assert record is not None
    assert (record["included"], record["void_slots"]) == (["a@0", "b@0"], 1)
    assert play.upload("c", 0, abody(*trained(model, "c", 0), 0))[0] == 409  # job done
    verdict = check_job(play.store, "job", play.accepted())
    assert verdict.ok, verdict


def test_clip_in_async_clips_each_delta_from_its_own_base(monkeypatch: pytest.MonkeyPatch) -> None:
    play = AsyncPlay(
        initial_model(7),
        monkeypatch,
        buffer=3,
        rounds=3,
        fan_in=2,
        round_timeout=1e9,
        strategy_options={"clip": 0.5},
    )
    run_job(play, make_plan(7, 3, 3, stale=1))
    check_against_reference(play, 3)
    records = [play.record(r) for r in (1, 2, 3)]
    assert all(r is not None and r["clip"]["bound"] == 0.5 for r in records)
    assert sum(r["clip"]["clipped"] for r in records if r) > 0  # the bound did bite
    verdict = check_job(play.store, "job", play.accepted())
    assert verdict.ok, verdict


def test_leaf_folds_before_the_previous_version_exists(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffer 2 fills and folds while version 1 waits for a lost event; version 2 commits right
    after version 1 (commits are sequential)."""
    model = initial_model(8)
    play = AsyncPlay(model, monkeypatch, buffer=2, rounds=2, fan_in=1, round_timeout=1e9)
    for c in ("a", "b", "c", "d"):
        assert play.upload(c, 0, abody(*trained(model, c, 0), 0))[1]["version_buffer"] == (
            1 if c in "ab" else 2
        )
    held = [e for e in play.queue if e.data.get("round") == 1]
    play.queue = [e for e in play.queue if e.data.get("round") != 1]
    while play.queue:
        play.step(None)
    assert (
        play.model(1) is None
        and play.store.objects.get("jobs/job/rounds/00000002/seal.json") is not None
    )
    assert Rounds(play.store, play.spec).nodes(2) == {(0, 0), (0, 1)}
    play.queue = held
    while play.queue:
        play.step(None)
    assert play.record(2) is not None and play.record(2)["staleness"] == {"c@0": 1, "d@0": 1}  # type: ignore[index]
    check_against_reference(play, 2)


def test_a_request_the_bus_refused_is_published_by_the_retry(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Finalize's first publish of a leaf request fails (a cold producer's flush timing out):
    the retried update.accepted requests the leaf again, so version 1 commits from events
    alone, no ping (before: the retry found the marker, published nothing, and version 1
    waited for the sweep's resend)."""
    model = initial_model(8)
    play = AsyncPlay(model, monkeypatch, buffer=2, rounds=1, fan_in=2, round_timeout=1e9)
    publish, refused = MemoryBus.publish, []

    def flaky(bus: MemoryBus, events: Any, key: str) -> None:
        if not refused and events[0].type == PARTIAL_REQUESTED:
            refused.append(events[0].id)
            raise BusUnavailable("Kafka at test did not acknowledge 1 event(s): timed out")
        publish(bus, events, key)

    monkeypatch.setattr(MemoryBus, "publish", flaky)
    for c in "ab":
        assert play.upload(c, 0, abody(*trained(model, c, 0), 0))[0] == 202
    while play.queue:
        play.step(None)
    assert refused and play.record(1) is not None  # no play.ping: the sweep never ran
    assert play.record(1)["included"] == ["a@0", "b@0"]  # type: ignore[index]
    check_against_reference(play, 1)
