"""Kafka and Pub/Sub side by side: the same round on the local platform over each event
transport, in one run, reported as ratios.

One host process (a child of run.py) starts the shared Kafka broker (localplat.kafka) and the
Pub/Sub emulator (microfl.local.pubsub): Google's pstest fake, served over gRPC by a small Go
program, holding topics and subscriptions in memory. Pub/Sub pushes to the functions; locally
that push is microfl.local.push, an agent in the runtime's process that pulls each subscription
from the emulator and POSTs every message to its function, acking it on success. So the Pub/Sub
numbers are those of the emulator plus the local push agent on this machine, not of the managed
service (whose publish and push delivery cross Google's network and have latencies of their own).

Repetitions alternate the transports (kafka, pubsub, kafka, ...) so that other load on the
machine falls on both alike. Each gets a fresh FileStore and LocalRuntime (the manifests of
knative/; consumer groups and subscription names of its own, so it inherits no events of an
earlier runtime). The runtime first runs an untimed warm-up job of WARMUP_CLIENTS clients (enough
chunks for every aggregate instance): instances start from zero, and the cold starts of function
processes and of their bus clients would otherwise dominate a comparison of transports. Then the
timed job: min_clients = N, a 100k-parameter model, fan-in 10; a load generator process posts
the N updates (each upload includes ingest's publish of update.accepted), and

- latency = the round record's committed_at - the arrival of the last 202, split at the seal and
  at the first and last partial written, as in round_latency;
- upload p50/p95 and updates/s as the load generator saw them;
- CPU seconds of every process during the round, the broker and the emulator included.

The PingSource's sweep is off (PING_INTERVAL): with its one-minute schedule it would commit some
rounds at a random moment, while here every round commits through the transport's events."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import secrets
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import report

__all__ = ["NAME", "markdown", "run"]

NAME = "transport_compare"
TRANSPORTS = ("kafka", "pubsub")
LABELS = {"kafka": "Kafka", "pubsub": "Pub/Sub (emulator)"}
REPEATS = 3
QUICK_REPEATS = 1
CLIENTS = 200
QUICK_CLIENTS = 30
PARAMS = 100_000
FAN_IN = 10
THREADS = 16
WARMUP_CLIENTS = 40  # 4 chunks: the aggregate Service's max-scale, all warm
PING_INTERVAL = 3600.0  # no sweep inside a round
IDLE_WINDOW = 600.0
COMMIT_TIMEOUT = 600.0
SAMPLE = 0.25
ROLES = ("ingest", "finalize", "aggregate")
BROKERS = ("kafka", "pubsub emulator")
HOST_ROLE = "runtime host (proxies, dispatchers)"
HERE = Path(__file__).resolve().parent


def run(quick: bool = False, workdir: Path | None = None, threads: int = THREADS) -> dict[str, Any]:
    repeats = QUICK_REPEATS if quick else REPEATS
    clients = QUICK_CLIENTS if quick else CLIENTS
    plan = [{"transport": t, "repeat": i + 1} for i in range(repeats) for t in TRANSPORTS]
    base = workdir or HERE.parent.parent / ".microfl" / "bench"
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="microfl-transports-", dir=base))
    try:
        result = procstat.run_step(
            Path(__file__), "host", str(tmp), json.dumps(plan), str(clients), str(threads)
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    summary = {t: _summary([r for r in result["runs"] if r["transport"] == t]) for t in TRANSPORTS}
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "clients": clients,
            "params": PARAMS,
            "fan_in": FAN_IN,
            "threads": threads,
            "repeats": repeats,
            "warmup_clients": WARMUP_CLIENTS,
            "store": "FileStore on the work directory's disk",
            "kafka": "1 KRaft node (microfl.local.kafka), KafkaSources as microfl.local.dispatcher",
            "pubsub": "pstest emulator (microfl.local.pubsub), push by microfl.local.push",
            "manifests": "knative/ (min-scale 0; consumer groups and subscriptions per runtime)",
        },
        "runs": result["runs"],
        "summary": summary,
        "ratios": {k: _ratio(summary["pubsub"][k], summary["kafka"][k]) for k in summary["kafka"]},
        "within_target": True,  # the issue sets no target for the transports: reported only
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    def median(get: Any) -> float:
        return statistics.median(get(r) for r in rows)

    return {
        "latency_s": median(lambda r: r["latency"]["total"]),
        "to_seal_s": median(lambda r: r["latency"]["to_seal"]),
        "seal_to_commit_s": median(lambda r: r["latency"]["total"] - r["latency"]["to_seal"]),
        "upload_p50_s": median(lambda r: r["post"]["p50_s"]),
        "upload_p95_s": median(lambda r: r["post"]["p95_s"]),
        "updates_per_s": median(lambda r: r["post"]["updates_per_s"]),
        "broker_cpu_s": median(lambda r: sum(r["cpu_s"].get(b, 0.0) for b in BROKERS)),
        "host_cpu_s": median(lambda r: r["cpu_s"].get(HOST_ROLE, 0.0)),
    }


def _ratio(a: float, b: float) -> float | None:
    """a / b; None where that means nothing (a split of a few ms either side of zero)."""
    return a / b if a >= 0 and b > 0 else None


# --- the host process --------------------------------------------------------------------------


def host(workdir: Path, plan: list[dict[str, Any]], clients: int, threads: int) -> dict[str, Any]:
    import localplat

    from microfl.local.pubsub import PubSubEmulator

    runs = []
    with localplat.kafka(workdir) as kafka, PubSubEmulator(workdir / "pubsub") as emulator:
        procstat.log(NAME, f"Kafka at {kafka.bootstrap}, Pub/Sub emulator at {emulator.host}")
        for step in plan:
            row = _round(workdir, kafka, emulator, step["transport"], clients, threads)
            runs.append({**row, "repeat": step["repeat"]})
    return {"runs": runs}


def _round(
    workdir: Path, kafka: Any, emulator: Any, transport: str, n: int, threads: int
) -> dict[str, Any]:
    import localplat
    import synth

    from microfl.jobs import model_key
    from microfl.local import pubsub
    from microfl.local.reference import TOLERANCE, fedavg_error
    from microfl.local.runtime import LocalRuntime
    from microfl.rounds import nodes_prefix, record_key, seal_key
    from microfl.serde import json_from_bytes, tensors_from_safetensors
    from microfl.store import FileStore

    tag = f"{transport}-{secrets.token_hex(3)}"
    root = workdir / f"store-{tag}"
    store = FileStore(root)
    secret = secrets.token_urlsafe(24)
    runtime = LocalRuntime(
        store.url,
        kafka.bootstrap if transport == "kafka" else emulator.host,
        secret,
        workdir / f"runtime-{tag}",
        manifests=localplat.edit_manifests(workdir / f"knative-{tag}", {}, group=tag),
        ping_interval=PING_INTERVAL,
        idle_window=IDLE_WINDOW,
        bus=transport,
        subscriptions=tuple(
            dataclasses.replace(s, name=f"{s.name}-{tag}") for s in pubsub.SUBSCRIPTIONS
        ),
    )
    runtime.start()
    try:
        warm_job = f"warmup-{tag}"
        warm = _post(store, runtime, warm_job, WARMUP_CLIENTS, threads, secret)
        _wait(store, warm_job)
        warm["latency"] = float(
            json_from_bytes(store.read(record_key(warm_job, 1)) or b"{}")["committed_at"]
        ) - float(warm["last_202"])
        procstat.log(NAME, f"{tag}: warm ({WARMUP_CLIENTS} clients, {warm['latency']:.2f} s)")
        sampled = localplat.Sampled(
            runtime, kafka.pids(), SAMPLE, others=[("pubsub emulator", emulator.proc.pid)]
        ).start()
        job = f"round-{tag}"
        post = _post(store, runtime, job, n, threads, secret)
        procstat.log(
            NAME,
            f"{tag}: posted {n} in {post['seconds']:.1f} s ({post['updates_per_s']:.1f}/s, "
            f"p50 {post['p50_s'] * 1e3:.0f} ms, p95 {post['p95_s'] * 1e3:.0f} ms)",
        )
        _wait(store, job)
        time.sleep(0.5)  # let the last push's counter and CPU settle
        seen = sampled.stop()
        record = json_from_bytes(store.read(record_key(job, 1)) or b"{}")
        seal = json_from_bytes(store.read(seal_key(job, 1)) or b"{}")
        partial_times = sorted(
            os.stat(root / key).st_mtime for key in store.list(nodes_prefix(job, 1))
        )
        model, _ = tensors_from_safetensors(store.read(model_key(job, 1)) or b"")
        error = fedavg_error(model, synth.Updates(synth.model(PARAMS, 0), n, 1).fedavg())
    finally:
        runtime.stop()
        shutil.rmtree(root, ignore_errors=True)
    committed, last = float(record["committed_at"]), float(post["last_202"])
    sealed = float(seal["sealed_at"])
    first_partial = partial_times[0] if partial_times else math.nan
    last_partial = partial_times[-1] if partial_times else math.nan
    row = {
        "transport": transport,
        "clients": n,
        "chunks": math.ceil(n / FAN_IN),
        "warmup": {k: warm[k] for k in ("latency", "updates_per_s", "p50_s", "p95_s")},
        "post": post,
        "latency": {
            "total": committed - last,
            "to_seal": sealed - last,
            "seal_to_first_partial": first_partial - sealed,
            "partials": last_partial - first_partial,
            "last_partial_to_commit": committed - last_partial,
        },
        "finalize_events": _finalize_events(sampled.progress, last),
        "included": len(record.get("included", [])),
        "max_relative_error": error,
        **{k: seen[k] for k in ("peak_mib", "instances", "services", "dispatch")},
        "cpu_s": {**seen["cpu_s"], "load generator": post.get("cpu_s")},
    }
    procstat.log(
        NAME,
        f"{tag}: latency {row['latency']['total']:.2f} s after the last 202 (seal "
        f"+{row['latency']['to_seal']:.2f} s); error {error:.1e}",
    )
    if row["included"] != n or error > TOLERANCE:
        raise RuntimeError(f"{tag}: the round included {row['included']} of {n}, error {error}")
    return row


def _post(store: Any, runtime: Any, job: str, n: int, threads: int, secret: str) -> dict[str, Any]:
    """Create job (min_clients = n) and post its n updates; the load generator's summary."""
    import localplat
    import synth

    from microfl.jobs import JobSpec, create_job
    from microfl.serde import tensors_to_safetensors

    base = synth.model(PARAMS, 0)
    spec = JobSpec.for_model(
        job, base, rounds=1, min_clients=n, fan_in=FAN_IN, round_timeout=3600.0,
        created_at=time.time(),
    )  # fmt: skip
    create_job(store, spec, tensors_to_safetensors(base))
    got = localplat.loadgen(runtime.ingest_url, job, n, PARAMS, threads, secret)
    if got["accepted"] != n:
        raise RuntimeError(
            f"{job}: {got['accepted']} of {n} updates accepted: {got['statuses']} {got['errors']}"
        )
    return got


def _wait(store: Any, job: str) -> None:
    from microfl.rounds import record_key

    deadline = time.monotonic() + COMMIT_TIMEOUT
    while not store.exists(record_key(job, 1)):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{job}: round 1 not committed in {COMMIT_TIMEOUT:.0f} s")
        time.sleep(0.02)


def _finalize_events(progress: list[tuple[float, dict[str, int]]], last: float) -> dict[str, Any]:
    """Events delivered to finalize (update.accepted, partial.ready) after the last 202, and
    when (seconds after it) the last of them was."""
    if not progress:
        return {"after_last_202": None, "last_delivery_after_s": None}
    group = next(g for g in progress[-1][1] if g.startswith("microfl-finalize"))
    final = progress[-1][1][group]
    at_last = max((d[group] for t, d in progress if t <= last), default=progress[0][1][group])
    done = next(t for t, d in progress if d[group] == final)
    return {"after_last_202": final - at_last, "last_delivery_after_s": done - last}


# --- report ------------------------------------------------------------------------------------


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg, s, q = result["config"], result["summary"], result["ratios"]
    k, p = s["kafka"], s["pubsub"]
    lines = [
        "## Kafka and Pub/Sub side by side",
        "",
        f"The same round over each event transport, {cfg['repeats']} time(s) each, alternating "
        "(Kafka, Pub/Sub, Kafka, ...), each on a fresh FileStore and LocalRuntime (knative/, "
        "instances from zero) after an untimed warm-up job of "
        f"{cfg['warmup_clients']} clients that starts the instances. Timed job: min_clients = "
        f"{cfg['clients']}, {cfg['params']:,} float32 parameters "
        f"({cfg['params'] * 4 / 1e3:.0f} KB per update), fan-in {cfg['fan_in']}; a load "
        f"generator process posts the updates with {cfg['threads']} threads. Latency is the "
        "round record's committed_at minus the arrival of the last 202; an upload includes "
        "ingest's publish of update.accepted. The scheduled sweep is off, so every round "
        "commits through events. Kafka: one KRaft broker, KafkaSources as the local "
        "dispatcher. **Pub/Sub: Google's pstest emulator (in memory, over gRPC) and the local "
        "push agent (microfl.local.push: pull, POST, ack), not the managed service.**",
        "",
        "| median | Kafka | Pub/Sub (emulator) | Pub/Sub / Kafka |",
        "| --- | ---: | ---: | ---: |",
        f"| **commit latency after the last 202, s** | {k['latency_s']:.2f} "
        f"| {p['latency_s']:.2f} | **{_x(q['latency_s'])}** |",
        f"| of which last 202 to seal, s | {k['to_seal_s']:.2f} | {p['to_seal_s']:.2f} "
        f"| {_x(q['to_seal_s'])} |",
        f"| of which seal to commit, s | {k['seal_to_commit_s']:.2f} "
        f"| {p['seal_to_commit_s']:.2f} | {_x(q['seal_to_commit_s'])} |",
        f"| upload p50, ms | {k['upload_p50_s'] * 1e3:.0f} | {p['upload_p50_s'] * 1e3:.0f} "
        f"| {_x(q['upload_p50_s'])} |",
        f"| upload p95, ms | {k['upload_p95_s'] * 1e3:.0f} | {p['upload_p95_s'] * 1e3:.0f} "
        f"| {_x(q['upload_p95_s'])} |",
        f"| updates/s | {k['updates_per_s']:.1f} | {p['updates_per_s']:.1f} "
        f"| {_x(q['updates_per_s'])} |",
        f"| CPU s of the broker / emulator | {k['broker_cpu_s']:.1f} | {p['broker_cpu_s']:.1f} "
        f"| {_x(q['broker_cpu_s'])} |",
        f"| CPU s of the runtime host (proxies, dispatchers / push) | {k['host_cpu_s']:.1f} "
        f"| {p['host_cpu_s']:.1f} | {_x(q['host_cpu_s'])} |",
        "",
        "Every run (CPU seconds from the first post to the commit; *broker* is the Kafka broker "
        "or the emulator, whichever the run used; *finalize events after last 202*: "
        "update.accepted and partial.ready events delivered to finalize after it, and when the "
        "last was). Finalize takes a job's events one at a time, in order (the Kafka partition "
        "or the Pub/Sub ordering key is the job), so the partial.ready events wait behind the "
        "update.accepted events still queued at the seal: that backlog is most of *last "
        "partial to commit*.",
        "",
        "| # | transport | warm-up latency s | posting s | updates/s | p50 / p95 ms "
        "| **latency s** | to seal | seal to 1st partial | partials | last partial to commit "
        "| finalize events after last 202 | CPU s: ingest | finalize | aggregate | broker "
        "| runtime host | max rel. error |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, r in enumerate(result["runs"], 1):
        lat, post, cpu, ev = r["latency"], r["post"], r["cpu_s"], r["finalize_events"]
        broker = cpu.get("kafka" if r["transport"] == "kafka" else "pubsub emulator", 0.0)
        events = (
            f"{ev['after_last_202']} (+{ev['last_delivery_after_s']:.2f} s)"
            if ev["after_last_202"] is not None
            else "-"
        )
        cells = [
            str(i),
            LABELS[r["transport"]],
            f"{r['warmup']['latency']:.2f}",
            f"{post['seconds']:.1f}",
            f"{post['updates_per_s']:.1f}",
            f"{post['p50_s'] * 1e3:.0f} / {post['p95_s'] * 1e3:.0f}",
            f"**{lat['total']:.2f}**",
            f"{lat['to_seal']:.2f}",
            f"{lat['seal_to_first_partial']:.2f}",
            f"{lat['partials']:.2f}",
            f"{lat['last_partial_to_commit']:.2f}",
            events,
            *(f"{cpu.get(role, 0.0):.1f}" for role in ROLES),
            f"{broker:.1f}",
            f"{cpu.get(HOST_ROLE, 0.0):.1f}",
            f"{r['max_relative_error']:.1e}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Ratios are Pub/Sub over Kafka: above 1 means the emulator path took longer (latency, "
        "upload times, CPU) or got more done (updates/s). No target is set for the transports.",
        "",
        report.run_line(result, machine),
    ]
    return "\n".join(lines)


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


if __name__ == "__main__":
    procstat.step_main(host)
