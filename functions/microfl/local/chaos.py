"""Local fault scenarios (`microfl chaos SCENARIO`): a real FL job on the 3-broker Kafka cluster
(RF 3, min ISR 2) and the GCS emulator while faults are injected, then the invariant checker.

Each scenario is seeded and bounded in time; clients are plain numpy clients over HTTP, so a
scenario's updates depend only on the seed and the models committed before it, and a faulty
run that includes the same updates must commit the same model bytes as the healthy run."""

from __future__ import annotations

import hashlib
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from microfl.client import Client
from microfl.jobs import JobSpec, create_job, load_job, model_key, revoke_client
from microfl.local import attacks
from microfl.local.chaos_clients import Progress, async_versions, sync_rounds, wait
from microfl.local.gcs import FakeGcsServer
from microfl.local.invariants import check_job
from microfl.local.kafka import KafkaCluster, read_events
from microfl.local.proxies import EventChaosProxy, SlowTcpProxy
from microfl.local.runtime import LocalRuntime
from microfl.rounds import seal_key
from microfl.serde import tensors_to_safetensors
from microfl.store import GcsStore
from microfl.tokens import issue_token

__all__ = ["SCENARIOS", "ChaosEnv", "ScenarioResult", "run_scenario", "scenario_names"]

SECRET = "microfl-chaos-secret-0123456789-abcdef"


@dataclass
class ChaosEnv:
    """The real parts every scenario shares: 3 Kafka nodes and the GCS emulator."""

    workdir: Path
    kafka: KafkaCluster | None = None
    gcs: FakeGcsServer | None = None
    bucket: str = ""

    def start(self) -> ChaosEnv:
        import os

        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        self.kafka = KafkaCluster(
            self.workdir / "kafka", nodes=3, logdir=self.workdir / "logs"
        ).start()
        self.gcs = FakeGcsServer(self.workdir / "logs").start()
        os.environ["STORAGE_EMULATOR_HOST"] = self.gcs.url
        self.bucket = f"chaos-{uuid.uuid4().hex[:8]}"
        storage.Client(project="chaos", credentials=AnonymousCredentials()).create_bucket(
            self.bucket
        )
        return self

    def stop(self) -> None:
        if self.gcs is not None:
            self.gcs.stop()
        if self.kafka is not None:
            self.kafka.stop()


@dataclass
class ScenarioResult:
    name: str
    rounds: int
    rounds_committed: int
    accepted: int
    lost: int
    double_counted: int
    wrong_models: int
    late_rounds: int
    dead_letters: int
    recovery_seconds: list[float]
    faults: list[str]
    model_sha256: str
    seconds: float
    equals_healthy: bool | None = None
    problems: list[str] = field(default_factory=list)
    hostile: dict[str, int] | None = None  # counts of the hostile-clients scenario

    @property
    def ok(self) -> bool:
        return not self.problems and self.rounds_committed == self.rounds


@dataclass
class Run:
    """What a fault function can touch while the clients train."""

    env: ChaosEnv
    runtime: LocalRuntime
    store: GcsStore
    job: str
    skew_file: Path
    round_started: list[threading.Event]
    round_posted: list[threading.Event]
    sealed: Callable[[int], bool]
    faults: list[tuple[str, float, float]] = field(default_factory=list)  # what, start, end
    answers: list[tuple[str, int, int]] = field(default_factory=list)  # hostile: name, want, got

    def fault(self, what: str, started: float) -> None:
        self.faults.append((what, started, time.monotonic()))


# --- the scenarios -------------------------------------------------------------------------


def _kill_functions(run: Run) -> None:
    run.round_started[1].wait(120)
    time.sleep(0.3)
    start = time.monotonic()
    run.runtime.services["ingest"].kill_all()
    run.fault("ingest SIGKILLed while clients post", start)
    wait(lambda: run.sealed(2), 120)
    for target in ("aggregate", "finalize"):
        start = time.monotonic()
        run.runtime.services[target].kill_all()
        run.fault(f"{target} SIGKILLed after the seal", start)


def _kill_brokers(run: Run) -> None:
    kafka = run.env.kafka
    assert kafka is not None
    run.round_started[0].wait(120)
    start = time.monotonic()
    kafka.kill(2)
    time.sleep(5)
    kafka.restart(2)
    run.fault("broker 2 SIGKILLed, back after 5 s", start)
    run.round_started[1].wait(120)
    victim = kafka.active_controller() or 1
    start = time.monotonic()
    kafka.kill(victim)
    time.sleep(5)
    kafka.restart(victim)
    run.fault(f"controller node {victim} SIGKILLed, back after 5 s", start)


def _stall_store(run: Run) -> None:
    gcs = run.env.gcs
    assert gcs is not None
    run.round_started[1].wait(120)
    time.sleep(0.3)
    start = time.monotonic()
    gcs.pause()
    time.sleep(4)
    gcs.resume()
    run.fault("object store stalled (SIGSTOP) for 4 s", start)


def _jump_clock(run: Run) -> None:
    for r, posted in enumerate(run.round_posted, 1):
        posted.wait(240)  # every client has posted; the quorum is out of reach by design
        start = time.monotonic()
        run.skew_file.write_text(str(r * (JUMP_TIMEOUT + 5)))
        run.fault(f"round {r}: clock jumped 5 s past the deadline", start)


def _attack(run: Run) -> None:
    limit = load_job(run.store, run.job).update_limit
    revoke_client(run.store, run.job, attacks.REVOKED, time.time())
    reader = issue_token(SECRET.encode(), run.job, "evil-reader")
    model, _ = Client(run.runtime.ingest_url, run.job, reader).model()
    for r, started in enumerate(run.round_started, 1):
        started.wait(240)
        start = time.monotonic()
        target = attacks.Target(run.runtime.ingest_url, run.job, r, model, SECRET.encode(), limit)
        run.answers += attacks.fire(target, prefix=f"evil{r}")
        run.fault(f"round {r}: {len(attacks.ATTACKS) + 1} hostile uploads", start)


JUMP_TIMEOUT = 3600.0

SCENARIOS: dict[str, dict[str, Any]] = {
    "healthy": {"fault": None},
    "function-kill": {"fault": _kill_functions},
    "broker-kill": {"fault": _kill_brokers},
    "store-stall": {"fault": _stall_store},
    "store-slow": {"slow_store": 0.003},
    "event-chaos": {"event_chaos": True},
    "client-retry": {"client_timeout": 0.15},
    "clock-jump": {"fault": _jump_clock, "quorum_extra": 1, "round_timeout": JUMP_TIMEOUT},
    "hostile-clients": {"fault": _attack, "replays": 5},
}
SYNC_ONLY = {"clock-jump", "hostile-clients"}  # their faults are timed by rounds


def scenario_names(scenario: str, mode: str = "sync") -> list[str]:
    """healthy and `scenario`, or every scenario ("all") that has a form for the mode."""
    if mode == "async" and scenario in SYNC_ONLY:
        raise ValueError(f"scenario {scenario!r} is about rounds; async jobs run the others")
    names = list(SCENARIOS) if scenario == "all" else ["healthy", scenario]
    return [n for n in dict.fromkeys(names) if mode == "sync" or n not in SYNC_ONLY]


# --- running one -------------------------------------------------------------------------------


def run_scenario(
    env: ChaosEnv,
    name: str,
    seed: int = 0,
    clients: int = 8,
    rounds: int = 3,
    say: Callable[[str], None] = print,
    strategy: str = "fedavg",
    strategy_options: dict[str, float] | None = None,
    mode: str = "sync",
    buffer: int = 0,
) -> ScenarioResult:
    """Run scenario `name` on a new job with the given aggregation strategy; with mode
    "async", a FedBuff job of `rounds` versions of `buffer` updates (default clients - 2)
    whose clients post continuously on the version they fetched."""
    options = SCENARIOS[name]
    if mode == "async" and name in SYNC_ONLY:
        raise ValueError(f"scenario {name!r} is about rounds; async jobs run the others")
    jobmode = {"mode": "async", "buffer": buffer or max(1, clients - 2)} if mode == "async" else {}
    t0 = time.monotonic()
    work = env.workdir / name
    work.mkdir(parents=True, exist_ok=True)
    skew = work / "clock-skew"
    skew.write_text("0")
    env_extra = {"MICROFL_CLOCK_SKEW_FILE": str(skew)}
    slow = None
    if options.get("slow_store"):
        assert env.gcs is not None
        slow = SlowTcpProxy(("127.0.0.1", env.gcs.port), options["slow_store"])
        env_extra["STORAGE_EMULATOR_HOST"] = slow.url
    wrap = None
    proxies: list[EventChaosProxy] = []
    if options.get("event_chaos"):

        def wrap(url: str) -> str:
            proxy = EventChaosProxy(url, seed + len(proxies))
            proxies.append(proxy)
            return proxy.url

    store = GcsStore(env.bucket)
    rng = np.random.default_rng(seed)
    model: dict[str, np.ndarray] = {
        "w": rng.standard_normal((32, 16)).astype(np.float32),
        "b": np.zeros(16, np.float32),
        "scale": np.ones(4, np.float64),
    }
    job = f"{name}-{seed}-{uuid.uuid4().hex[:6]}"
    spec = JobSpec.for_model(
        job,
        model,
        rounds=rounds,
        min_clients=clients + options.get("quorum_extra", 0),
        round_timeout=options.get("round_timeout", 120.0),
        fan_in=3,
        strategy=strategy,
        strategy_options=strategy_options or {},
        created_at=time.time(),
        **jobmode,
    )
    create_job(store, spec, tensors_to_safetensors(model))
    assert env.kafka is not None
    runtime = LocalRuntime(
        store.url,
        env.kafka.bootstrap,
        SECRET,
        work,
        ping_interval=1.0,
        env_extra=env_extra,
        replication=3,
        wrap_sink=wrap,
    ).start()
    progress = Progress(rounds)
    run = Run(
        env,
        runtime,
        store,
        job,
        skew,
        progress.started,
        progress.posted,
        lambda r: store.exists(seal_key(job, r)),
    )
    faulter = None
    if options.get("fault"):
        faulter = threading.Thread(target=options["fault"], args=(run,), daemon=True)
        faulter.start()
    try:
        what = f"versions of K = {spec.buffer}" if mode == "async" else "rounds"
        say(f"[{name}] job {job}: {clients} clients x {rounds} {what}, {strategy}")
        timeout = options.get("client_timeout", 60.0)
        users = [
            Client(
                runtime.ingest_url,
                job,
                issue_token(SECRET.encode(), job, f"c{i}"),
                retries=12,
                backoff=0.3,
                timeout=timeout,
            )
            for i in range(clients)
        ]
        tell = lambda m: say(f"[{name}] {m}")  # noqa: E731
        if mode == "async":
            async_versions(users, store, job, progress, seed, tell)
        else:
            sync_rounds(users, store, job, progress, seed, options.get("replays", 0), tell)
        if faulter is not None:
            faulter.join(timeout=120)
    finally:
        runtime.stop()
        for proxy in proxies:
            proxy.close()
        if slow is not None:
            slow.close()
    accepted, commits, problems = progress.accepted, progress.commits, progress.problems
    verdict = check_job(store, job, accepted, secret=SECRET.encode())
    dead = _dead_letters(env, job)
    hostile = None
    if options.get("fault") is _attack:
        replays = len(accepted) * options["replays"]
        hostile = attacks.counts(
            run.answers, store, job, _bootstrap(env), rounds, len(accepted), replays
        )
        problems += [
            f"hostile upload {name!r} answered {got}, not {want}"
            for name, want, got in run.answers
            if got != want
        ]
        problems += [f"{hostile['stored']} hostile upload(s) stored"] * (hostile["stored"] > 0)
        if hostile["announcements"] > hostile["accepted"]:  # at most one per new update
            problems.append(
                f"{hostile['announcements']} update.accepted events for {hostile['accepted']} "
                f"accepted updates and {hostile['replays']} replays: replays must publish nothing"
            )
    problems += [f"lost {x}" for x in verdict.lost] + [
        f"double {x}" for x in verdict.double_counted
    ]
    problems += [f"model of {x} is not the {strategy} of its updates" for x in verdict.wrong_models]
    problems += [f"tree of {x}" for x in verdict.bad_trees]
    problems += verdict.late_rounds + [f"{dead} unexplained dead-lettered event(s)"] * (dead > 0)
    # Recovery: from a fault's end to the first commit after it began (0: no disruption seen).
    recovery = [
        round(max(0.0, min((c for c in commits if c >= start), default=end) - end), 2)
        for _, start, end in run.faults
    ]
    conditions = {
        "slow_store": f"every object-store chunk delayed {options.get('slow_store')} s",
        "event_chaos": f"events delayed up to 0.3 s; {sum(p.duplicates for p in proxies)} "
        "delivered twice, late and out of order",
        "client_timeout": f"client timeout {options.get('client_timeout')} s: requests time "
        "out and are retried",
    }
    described = [text for key, text in conditions.items() if options.get(key)]
    final = store.read(model_key(job, verdict.rounds_committed)) or b""
    return ScenarioResult(
        name,
        rounds,
        verdict.rounds_committed,
        len(accepted),
        len(verdict.lost),
        len(verdict.double_counted),
        len(verdict.wrong_models),
        len(verdict.late_rounds),
        dead,
        recovery,
        described + [what for what, _, _ in run.faults],
        hashlib.sha256(final).hexdigest(),
        round(time.monotonic() - t0, 1),
        problems=problems,
        hostile=hostile,
    )


def _bootstrap(env: ChaosEnv) -> str:
    assert env.kafka is not None
    return env.kafka.bootstrap


def _dead_letters(env: ChaosEnv, job: str) -> int:
    return sum(
        data.get("job") == job
        for data, _ in read_events(
            _bootstrap(env), ["microfl.aggregate.dlq", "microfl.finalize.dlq"]
        )
    )
