"""`microfl paper`: the evaluation of the Micro-FL paper (Sabuhi, Musilek, Bezemer, Future
Internet 2024) run on the local platform, scaled to this machine.

Three real Kafka brokers (KRaft, RF 3, min ISR 2), the GCS emulator and the three functions;
users are the demo's torch clients over HTTP, training its MLP on non-IID digits shards. Each
size runs twice with the same seeds: healthy, and faulty, where one broker's JVM is SIGKILLed as
the iteration at 20/40/60/80 % of the run starts and restarted once `down` iterations have
committed (the paper's pod failure of one broker of three at iterations 20/40/60/80 of 100).
The same updates go in either way, so the faulty run must commit the healthy run's model bytes
at every iteration; the report (microfl.local.paperreport) shows both curves."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from microfl.local.demo_config import DemoConfig

__all__ = ["BrokerFaults", "PaperConfig", "add_arguments", "run_paper"]

Say = Callable[[str], None]


@dataclass(frozen=True)
class PaperConfig:
    users: tuple[int, ...] = (10, 100)
    iterations: int = 10
    at: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)  # where the fault windows start
    down: int = 1  # iterations a killed broker stays down
    epochs: int = 5
    processes: int = 2  # client worker processes
    threads: int = 32  # users of a process training and posting at once
    fan_in: int = 10
    alpha: float = 0.5
    seed: int = 0
    out: Path = Path("load/results/paper")

    def windows(self) -> list[tuple[int, int]]:
        """(first, last) iteration of each fault window; they never overlap, so at most one
        broker of three is ever down (the paper's schedule; min ISR 2 holds)."""
        n = self.iterations
        starts = sorted({min(n, max(1, round(f * n))) for f in self.at})
        ends = [*starts[1:], n + 1]
        return [(s, min(s + self.down, nxt) - 1) for s, nxt in zip(starts, ends, strict=True)]

    def demo(self, users: int) -> DemoConfig:
        return DemoConfig(
            clients=users,
            rounds=self.iterations,
            alpha=self.alpha,
            epochs=self.epochs,
            fan_in=self.fan_in,
            processes=self.processes,
            threads=self.threads,
            seed=self.seed,
        )


@dataclass
class BrokerFaults:
    """SIGKILLs broker (k mod 3) + 1 as window k's first iteration starts, restarts it (in a
    thread, the run goes on) once the window's last iteration has committed. Before a kill it
    waits, off the clock, until the last restart is done and every replica is back in sync."""

    kafka: Any
    windows: list[tuple[int, int]]
    in_sync: Callable[[], bool]
    say: Say
    t0: float = field(default_factory=time.monotonic)
    log: list[dict[str, Any]] = field(default_factory=list)
    _restart: threading.Thread | None = None

    def before(self, r: int) -> None:
        for k, (first, _) in enumerate(self.windows):
            if r == first:
                self._settle()
                node = k % len(self.kafka.members) + 1
                self.kafka.kill(node)
                now = time.monotonic() - self.t0
                self.log.append({"broker": node, "first": first, "last": self.windows[k][1],
                                 "killed_at": round(now, 2)})  # fmt: skip
                self.say(f"broker {node} SIGKILLed as iteration {r} starts")

    def after(self, r: int) -> None:
        for entry in self.log:
            if entry["last"] == r and "restarted_at" not in entry:
                self._restart = threading.Thread(target=self._back, args=(entry,), daemon=True)
                self._restart.start()

    def _back(self, entry: dict[str, Any]) -> None:
        self.kafka.restart(entry["broker"], wait=True, timeout=120)
        entry["restarted_at"] = round(time.monotonic() - self.t0, 2)
        entry["down_s"] = round(entry["restarted_at"] - entry["killed_at"], 2)
        self.say(f"broker {entry['broker']} back after {entry['down_s']:g} s")

    def _settle(self, timeout: float = 180.0) -> None:
        if self._restart is not None:
            self._restart.join(timeout)
        deadline = time.monotonic() + timeout
        while not self.in_sync() and time.monotonic() < deadline:
            time.sleep(0.5)

    def finish(self) -> None:
        """Every broker up again, whatever happened."""
        if self._restart is not None:
            self._restart.join(180)
        for node in self.kafka.members:
            if not node.alive:
                self.kafka.restart(node.node_id, wait=True, timeout=120)


def run_paper(config: PaperConfig, say: Say = print, env: Any = None) -> dict[str, Any]:
    """Every size healthy then faulty on one cluster (a started ChaosEnv, else one started
    here); the report is rewritten after each run, so an interrupted experiment leaves what it
    measured. Returns the results document."""
    from microfl.local.chaos import ChaosEnv
    from microfl.local.demo_clients import client_pool
    from microfl.local.paperreport import write_report

    t0 = time.monotonic()
    own = env is None
    work = Path(tempfile.mkdtemp(prefix="microfl-paper-"))
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "windows": config.windows(),
        "machine": _machine(),
        "runs": [],
    }
    if own:
        say(f"starting 3 Kafka brokers (RF 3, min ISR 2) and the GCS emulator in {work} ...")
        env = ChaosEnv(work).start()
    try:
        for users in config.users:
            demo = config.demo(users)
            with client_pool(demo) as pool:
                # Spawn the workers (torch import, shards) before any clock starts.
                for done in [pool.submit(time.sleep, 0.5) for _ in range(demo.processes)]:
                    done.result()
                for faulty in (False, True):
                    results["runs"].append(_run(env, work, config, demo, pool, faulty, say))
                    results["seconds"] = round(time.monotonic() - t0, 1)
                    write_report(config.out, results)
    finally:
        if own:
            env.stop()
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        shutil.rmtree(work, ignore_errors=True)
    say(f"report: {config.out}/summary.md ({results['seconds']:g} s in all)")
    return results


def _machine() -> dict[str, Any]:
    import platform

    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }


def _run(
    env: Any,
    work: Path,
    config: PaperConfig,
    demo: DemoConfig,
    pool: ProcessPoolExecutor,
    faulty: bool,
    say: Say,
) -> dict[str, Any]:
    """One job of demo.clients users: per iteration its accuracy, time, CPU and memory per
    component, Kafka traffic; then the invariant checker's verdict."""
    import torch

    from microfl.client.torch import evaluate, load_into_module, mlp, tensors_from_module
    from microfl.jobs import JobSpec, create_job, model_key
    from microfl.local.chaos import SECRET
    from microfl.local.chaos_clients import wait
    from microfl.local.demo_clients import members, run_clients
    from microfl.local.demo_data import digits_shards
    from microfl.local.invariants import check_job
    from microfl.local.papermeter import KafkaMeter, ProcessMeter, component_roots
    from microfl.local.runtime import LocalRuntime
    from microfl.rounds import record_key
    from microfl.serde import tensors_from_safetensors, tensors_to_safetensors
    from microfl.store import GcsStore
    from microfl.tokens import issue_token

    users, n = demo.clients, config.iterations
    label = f"{users} users, {'faulty' if faulty else 'healthy'}"
    tell: Say = lambda m: say(f"[{label}] {m}")  # noqa: E731
    _, (x_test, y_test), _ = digits_shards(users, demo.alpha, demo.seed)
    torch.manual_seed(demo.seed)
    init = tensors_from_module(mlp())
    store = GcsStore(_new_bucket(f"paper-{users}-{'faulty' if faulty else 'healthy'}"))
    job = f"paper-{users}-{'faulty' if faulty else 'healthy'}-{uuid.uuid4().hex[:6]}"
    spec = JobSpec.for_model(job, init, rounds=n, min_clients=users, round_timeout=600.0,
                             fan_in=demo.fan_in, created_at=time.time())  # fmt: skip
    create_job(store, spec, tensors_to_safetensors(init))
    runtime = LocalRuntime(store.url, env.kafka.bootstrap, SECRET, work / job, replication=3)
    runtime.start()
    tokens = [issue_token(SECRET.encode(), job, f"client-{i:03d}") for i in range(users)]
    groups = members(demo, tokens, range(0), None)
    kafka_meter = KafkaMeter(env.kafka)
    faults = BrokerFaults(env.kafka, config.windows() if faulty else [], kafka_meter.isr_full,
                          tell)  # fmt: skip
    meter = ProcessMeter(partial(component_roots, runtime, env.kafka, env.gcs)).start()
    model = mlp()
    rows: list[dict[str, Any]] = []
    accepted: set[tuple[int, str]] = set()
    records, logs = kafka_meter.records(), kafka_meter.log_bytes()
    tell(f"job {job}: {n} iterations, {demo.epochs} local epochs, fan-in {demo.fan_in}")
    try:
        for r in range(1, n + 1):
            faults.before(r)
            start = time.monotonic()
            futures = [pool.submit(run_clients, runtime.ingest_url, job, g, demo, r)
                       for g in groups]  # fmt: skip
            answers = [a for f in futures for a in f.result()]
            if not wait(partial(store.exists, record_key(job, r)), 600):
                raise TimeoutError(f"{label}: iteration {r} did not commit in 600 s")
            seconds = time.monotonic() - start
            usage = meter.cut()
            faults.after(r)
            accepted |= {(r, a["client"]) for a in answers if a["status"] in ("accepted", "replay")}
            blob = store.read(model_key(job, r)) or b""
            load_into_module(model, tensors_from_safetensors(blob)[0])
            loss, acc = evaluate(model, x_test, y_test)
            record = json.loads(store.read(record_key(job, r)) or b"{}")
            now_records, now_logs = kafka_meter.records(), kafka_meter.log_bytes()
            rows.append({
                "iteration": r,
                "accuracy": acc,
                "loss": loss,
                "seconds": round(seconds, 3),
                "included": len(record.get("included", [])),
                "bytes_uploaded": sum(int(a.get("bytes", 0)) for a in answers),
                "broker_down": any(w[0] <= r <= w[1] for w in faults.windows),
                "components": usage,
                "kafka_records": None if None in (records, now_records)
                else now_records - records,  # type: ignore[operator]
                "kafka_log_bytes": {b: now_logs[b] - logs[b] for b in now_logs},
                "model_sha256": hashlib.sha256(blob).hexdigest(),
            })  # fmt: skip
            records = now_records if now_records is not None else records
            logs = now_logs
            cpu = sum(c["cpu_s"] for c in usage.values())
            tell(f"iteration {r}/{n}: accuracy {acc:.3f}, {seconds:.2f} s, "
                 f"{rows[-1]['included']} updates, platform CPU {cpu:.1f} s"
                 + (" (a broker is down)" if rows[-1]["broker_down"] else ""))  # fmt: skip
    finally:
        faults.finish()
        meter.stop()
        runtime.stop()
        kafka_meter.close()
    verdict = check_job(store, job, accepted, secret=SECRET.encode())
    problems = [f"lost {x}" for x in verdict.lost] + [f"double {x}" for x in verdict.double_counted]
    problems += [f"wrong model {x}" for x in verdict.wrong_models] + verdict.late_rounds
    problems += [f"tree of {x}" for x in verdict.bad_trees]
    ok = verdict.ok and verdict.rounds_committed == n
    tell(f"invariant checker: {'ok' if ok else 'FAILED: ' + '; '.join(problems)}")
    return {
        "users": users,
        "faulty": faulty,
        "job": job,
        "rows": rows,
        "faults": faults.log,
        "accepted": len(accepted),
        "verdict": {
            "ok": ok,
            "rounds_committed": verdict.rounds_committed,
            "lost": len(verdict.lost),
            "double_counted": len(verdict.double_counted),
            "problems": problems,
        },  # fmt: skip
    }


def _new_bucket(prefix: str) -> str:
    """A bucket per run: the emulator's listings slow down as a bucket fills, which would bias
    the later runs' times."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    name = f"{prefix}-{uuid.uuid4().hex[:8]}"
    storage.Client(project="paper", credentials=AnonymousCredentials()).create_bucket(name)
    return name


# --- the command -----------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = PaperConfig()
    p.add_argument("--users", type=int, nargs="+", default=list(d.users),
                   help="the sizes to run, each healthy and faulty")  # fmt: skip
    p.add_argument("--iterations", type=int, default=d.iterations, help="FL rounds per run")
    p.add_argument("--down", type=int, default=d.down,
                   help="iterations a killed broker stays down")  # fmt: skip
    p.add_argument("--epochs", type=int, default=d.epochs, help="local epochs per iteration")
    p.add_argument("--processes", type=int, default=d.processes, help="client worker processes")
    p.add_argument("--threads", type=int, default=d.threads,
                   help="users of a client process training and posting at once")  # fmt: skip
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--out", type=Path, default=d.out, help="report folder")
    p.set_defaults(func=cmd_paper)


def cmd_paper(args: argparse.Namespace) -> int:
    config = PaperConfig(
        users=tuple(args.users),
        iterations=args.iterations,
        down=args.down,
        epochs=args.epochs,
        processes=args.processes,
        threads=args.threads,
        seed=args.seed,
        out=args.out,
    )
    if min(config.iterations, *config.users, config.down, config.threads) < 1:
        raise ValueError("--iterations, --users, --down and --threads must be at least 1")
    results = run_paper(config, say=lambda m: print(m, flush=True))
    from microfl.local.paperreport import failures

    failed = failures(results)
    for line in failed:
        print(f"FAILED: {line}", flush=True)
    return 1 if failed else 0
