"""Round latency on the local platform, peak RSS of every function process, and the Kafka
broker's throughput during the round, for growing numbers of clients.

One host process (a child of run.py) starts a real Kafka broker (microfl.local.kafka) and, for
each N, a fresh LocalRuntime (the manifests of knative/, a FileStore in the work directory) and a
job of min_clients = N. A load generator process (loadgen.py) posts the N updates of a
1M-parameter model over HTTP from a thread pool; the round seals when the last one is stored.

- latency = the round record's committed_at - the time the last 202 arrived, split at the seal
  (seal.json's sealed_at) and at the first and last partial written (file mtimes);
- peak RSS = VmHWM of every function process (functions-framework master and its gunicorn
  workers), sampled every SAMPLE s so that instances that scale down are counted too; CPU
  seconds per process during the round;
- Kafka = records and bytes on the platform topics between just before the first post and just
  after the commit (watermarks, and the records consumed to size them), over that duration.

Instances start from zero as the manifests say (min-scale 0): the first aggregate instances
cold-start after the seal, inside the latency. Each N's store is deleted before the next."""

from __future__ import annotations

import argparse
import json
import math
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import procstat

__all__ = ["NAME", "markdown", "run"]

NAME = "round_latency"
CLIENTS = (100, 1000, 5000)
QUICK_CLIENTS = (100,)
PARAMS = 1_000_000
FAN_IN = 10
THREADS = 16
SAMPLE = 0.25
IDLE_WINDOW = 600.0  # instances stay for the whole round, so their VmHWM can be read at the end
COMMIT_TIMEOUT = 1200.0
TARGET_LATENCY = 2.0  # seconds after the last 202, at TARGET_CLIENTS
TARGET_CLIENTS = 1000
TARGET_FLAT = 1.5  # peak RSS of aggregate and finalize at the largest N over the smallest
FLAT_ROLES = ("aggregate", "finalize")
ROLES = ("ingest", "finalize", "aggregate")
HERE = Path(__file__).resolve().parent


def run(
    quick: bool = False,
    workdir: Path | None = None,
    clients: tuple[int, ...] | None = None,
    fan_in: int = FAN_IN,
    threads: int = THREADS,
) -> dict[str, Any]:
    sizes = clients or (QUICK_CLIENTS if quick else CLIENTS)
    tmp = Path(tempfile.mkdtemp(prefix="microfl-rounds-", dir=workdir or _default_workdir()))
    try:
        result = procstat.run_step(
            Path(__file__),
            "host",
            str(tmp),
            ",".join(map(str, sizes)),
            str(fan_in),
            str(threads),
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [r for r in result["runs"] if "skipped" not in r]
    flat = {}
    if len(rows) >= 2:
        first, last = rows[0], rows[-1]
        flat = {
            role: last["peak_mib"][role] / first["peak_mib"][role]
            for role in FLAT_ROLES
            if first["peak_mib"].get(role) and last["peak_mib"].get(role)
        }
    at = [r for r in rows if r["clients"] == TARGET_CLIENTS]
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "clients": list(sizes),
            "params": PARAMS,
            "fan_in": fan_in,
            "threads": threads,
            "store": "FileStore on the work directory's disk",
            "kafka": "1 KRaft node (microfl.local.kafka)",
            "manifests": "knative/ as is (min-scale 0)",
        },
        "runs": result["runs"],
        "flat_ratio": flat,
        "targets": {
            "latency_s": TARGET_LATENCY,
            "latency_clients": TARGET_CLIENTS,
            "flat_ratio": TARGET_FLAT,
        },
        "within_target": bool(at)
        and all(r["latency"]["total"] <= TARGET_LATENCY for r in at)
        and bool(flat)
        and all(v <= TARGET_FLAT for v in flat.values()),
    }


def _default_workdir() -> Path:
    """The repository's disk (the updates of 5,000 clients are 20 GB; /tmp may be small)."""
    path = HERE.parent.parent / ".microfl" / "bench"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- the host process --------------------------------------------------------------------------


def host(workdir: Path, sizes: list[int], fan_in: int, threads: int) -> dict[str, Any]:
    from microfl.local.kafka import KafkaCluster

    kafka = KafkaCluster(workdir / "kafka", logdir=workdir / "logs").start()
    procstat.log(NAME, f"Kafka up at {kafka.bootstrap}")
    runs = []
    try:
        for n in sizes:
            runs.append(_round(workdir, kafka, n, fan_in, threads))
    finally:
        kafka.stop()
    return {"runs": runs}


def _round(workdir: Path, kafka: Any, n: int, fan_in: int, threads: int) -> dict[str, Any]:
    import kafka_meter
    import synth
    from microfl.jobs import JobSpec, create_job, model_key, partials_prefix, record_key, seal_key
    from microfl.local.runtime import LocalRuntime
    from microfl.serde import json_from_bytes, tensors_from_safetensors, tensors_to_safetensors
    from microfl.store import FileStore

    model_bytes = PARAMS * 4
    need = n * (model_bytes + 4096) * 1.05 + math.ceil(n / fan_in) * model_bytes * 2 + 2e9
    free = shutil.disk_usage(workdir).free
    if free < need:
        procstat.log(NAME, f"N={n}: skipped, needs {need / 1e9:.1f} GB free, has {free / 1e9:.1f}")
        return {"clients": n, "skipped": f"needs {need / 1e9:.1f} GB free on {workdir}"}
    root = workdir / f"store-{n}"
    store = FileStore(root)
    base = synth.model(PARAMS, 0)
    job = f"round-{n}"
    spec = JobSpec.for_model(
        job, base, rounds=1, min_clients=n, fan_in=fan_in, round_timeout=3600.0,
        created_at=time.time(),
    )  # fmt: skip
    create_job(store, spec, tensors_to_safetensors(base))
    secret = secrets.token_urlsafe(24)
    runtime = LocalRuntime(
        store.url, kafka.bootstrap, secret, workdir / f"runtime-{n}", idle_window=IDLE_WINDOW
    )
    sampler = procstat.ProcessSampler()
    stop = threading.Event()

    def roles() -> list[tuple[str, int]]:
        found = [(p["role"], int(p["pid"])) for p in runtime.processes()]
        return found + [("kafka", pid) for pid in kafka.pids()]

    def sample_loop() -> None:
        while not stop.wait(SAMPLE):
            sampler.sample(roles())

    runtime.start()
    try:
        topics = kafka_meter.platform_topics()
        before = kafka_meter.watermarks(kafka.bootstrap, topics)
        sampler.sample(roles())
        sampler.mark()
        host_cpu = procstat.cpu_seconds() or 0.0
        thread = threading.Thread(target=sample_loop, daemon=True)
        thread.start()
        procstat.log(NAME, f"N={n}: posting {n} updates of {model_bytes / 1e6:.0f} MB")
        started = time.time()
        posted = subprocess.run(
            [
                sys.executable,
                str(HERE / "loadgen.py"),
                runtime.ingest_url,
                job,
                "--clients",
                str(n),
                "--params",
                str(PARAMS),
                "--threads",
                str(threads),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "MICROFL_SECRET": secret},
            check=False,
        )
        if posted.returncode != 0:
            raise RuntimeError(f"loadgen exited with {posted.returncode}")
        clients: dict[str, Any] = json.loads(posted.stdout.strip().splitlines()[-1])
        if clients["accepted"] != n:
            raise RuntimeError(
                f"N={n}: {clients['accepted']} of {n} updates accepted: {clients['statuses']} "
                f"{clients['errors']}"
            )
        procstat.log(
            NAME,
            f"N={n}:   posted in {clients['seconds']:.1f} s ({clients['updates_per_s']:.1f}/s, "
            f"p50 {clients['p50_s'] * 1e3:.0f} ms, p95 {clients['p95_s'] * 1e3:.0f} ms); "
            "waiting for the commit",
        )
        deadline = time.monotonic() + COMMIT_TIMEOUT
        while not store.exists(record_key(job, 1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"N={n}: round 1 not committed {COMMIT_TIMEOUT:.0f} s after")
            time.sleep(0.02)
        seen_at = time.time()
        time.sleep(1.0)  # round.committed is published right after the record is written
        stop.set()
        thread.join()
        sampler.sample(roles())
        host_cpu = (procstat.cpu_seconds() or 0.0) - host_cpu
        after = kafka_meter.watermarks(kafka.bootstrap, topics)
        record = json_from_bytes(store.read(record_key(job, 1)) or b"{}")
        seal = json_from_bytes(store.read(seal_key(job, 1)) or b"{}")
        partial_times = sorted(
            os.stat(root / key).st_mtime for key in store.list(partials_prefix(job, 1))
        )
        model, _ = tensors_from_safetensors(store.read(model_key(job, 1)) or b"")
        exact = synth.Updates(base, n, 1).fedavg()
        error = max(
            float(abs(model[k].astype("float64") - exact[k]).max() / abs(exact[k]).max())
            for k in exact
        )
        counters = {
            d.source.group: {
                k: getattr(d.counters, k) for k in ("delivered", "retried", "dead_lettered", "lost")
            }
            for d in runtime.dispatchers
        }
        services = {
            name: {"peak_instances": s.peak_instances, "cold_starts": s.cold_starts}
            for name, s in runtime.services.items()
        }
    finally:
        stop.set()
        runtime.stop()
        shutil.rmtree(root, ignore_errors=True)
    committed = float(record["committed_at"])
    last = float(clients["last_202"])
    procs = sampler.processes()
    duration = committed - started
    traffic = kafka_meter.traffic(kafka.bootstrap, before, after)
    row = {
        "clients": n,
        "fan_in": fan_in,
        "chunks": math.ceil(n / fan_in),
        "post": clients,
        "latency": {
            "total": committed - last,
            "to_seal": float(seal["sealed_at"]) - last,
            "seal_to_first_partial": (partial_times[0] - float(seal["sealed_at"]))
            if partial_times
            else None,
            "partials": (partial_times[-1] - partial_times[0]) if partial_times else None,
            "last_partial_to_commit": (committed - partial_times[-1]) if partial_times else None,
            "observed": seen_at - last,
        },
        "round_seconds": duration,
        "included": len(record.get("included", [])),
        "excluded": len(record.get("excluded", [])),
        "max_relative_error": error,
        "processes": procs,
        "peak_mib": _peaks(procs),
        "cpu_s": {
            **_cpu(procs),
            "runtime host (proxies, dispatchers)": host_cpu,
            "load generator": clients.get("cpu_s"),
        },
        "instances": {role: len({p["root"] for p in procs if p["role"] == role}) for role in ROLES},
        "services": services,
        "dispatch": counters,
        "kafka": {
            **traffic,
            "seconds": duration,
            "records_per_s": traffic["records"] / duration,
            "bytes_per_s": traffic["bytes"] / duration,
        },
    }
    procstat.log(
        NAME,
        f"N={n}:   latency {row['latency']['total']:.2f} s after the last 202 (seal "
        f"+{row['latency']['to_seal']:.2f} s); peak MiB {row['peak_mib']}; Kafka "
        f"{traffic['records']} records, {traffic['bytes'] / 1e3:.0f} kB; error {error:.1e}",
    )
    if row["included"] != n or error > 1e-6:
        raise RuntimeError(f"N={n}: the round included {row['included']} updates, error {error}")
    return row


def _peaks(procs: list[dict[str, Any]]) -> dict[str, float]:
    """Largest VmHWM of any one process of each role (a worker is where requests run)."""
    out: dict[str, float] = {}
    for p in procs:
        out[p["role"]] = max(out.get(p["role"], 0.0), p["vm_hwm_mib"])
    return out


def _cpu(procs: list[dict[str, Any]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for p in procs:
        out[p["role"]] = out.get(p["role"], 0.0) + p.get("cpu_s", 0.0)
    return out


# --- report ------------------------------------------------------------------------------------


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = [r for r in result["runs"] if "skipped" not in r]
    lines = [
        "## Round latency, memory and Kafka throughput on the local platform",
        "",
        f"A real Kafka broker and the three functions as processes ({cfg['manifests']}), "
        f"{cfg['store']}; one job with min_clients = N, {cfg['params']:,} float32 parameters "
        f"({cfg['params'] * 4 / 1e6:.0f} MB per update), fan-in {cfg['fan_in']}; a load "
        f"generator process posts the N updates over HTTP with {cfg['threads']} threads. "
        "Latency is the round record's committed_at minus the arrival of the last 202, "
        "split at the seal and at the first and last partial written. Peak RSS is the largest "
        "VmHWM of any process of the role (gunicorn worker or master), sampled every "
        f"{SAMPLE} s. Instances start from zero, so the aggregate instances' cold starts are "
        "inside the latency.",
        "",
        "| clients | chunks | posting s | updates/s | p50 / p95 ms | **latency s** | to seal "
        "| seal to 1st partial | partials | last partial to commit | max rel. error |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lat, post = r["latency"], r["post"]
        lines.append(
            f"| {r['clients']:,} | {r['chunks']} | {post['seconds']:.1f} "
            f"| {post['updates_per_s']:.1f} | {post['p50_s'] * 1e3:.0f} / "
            f"{post['p95_s'] * 1e3:.0f} | **{lat['total']:.2f}** | {lat['to_seal']:.2f} "
            f"| {_f(lat['seal_to_first_partial'])} | {_f(lat['partials'])} "
            f"| {_f(lat['last_partial_to_commit'])} | {r['max_relative_error']:.1e} |"
        )
    lines += [
        "",
        "Peak RSS (MiB, largest process of the role), instances, and CPU seconds used during "
        "the round:",
        "",
        "| clients | ingest | finalize | aggregate | instances i/f/a | CPU s: ingest | finalize "
        "| aggregate | Kafka | runtime host | load generator |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        pk, cpu, inst = r["peak_mib"], r["cpu_s"], r["instances"]
        lines.append(
            f"| {r['clients']:,} | {_f(pk.get('ingest'), 0)} | {_f(pk.get('finalize'), 0)} "
            f"| {_f(pk.get('aggregate'), 0)} | {inst['ingest']}/{inst['finalize']}/"
            f"{inst['aggregate']} | {_f(cpu.get('ingest'), 1)} | {_f(cpu.get('finalize'), 1)} "
            f"| {_f(cpu.get('aggregate'), 1)} | {_f(cpu.get('kafka'), 1)} "
            f"| {_f(cpu.get('runtime host (proxies, dispatchers)'), 1)} "
            f"| {_f(cpu.get('load generator'), 1)} |"
        )
    lines += [
        "",
        "Kafka broker throughput during the round (the paper's software metric): records and "
        "bytes (key + value + headers) produced to the platform topics from the first post to "
        "the commit, over that time.",
        "",
        "| clients | round s | records | records/s | bytes | bytes/s | per topic (records) |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        k = r["kafka"]
        topics = ", ".join(
            f"{t} {v['records']}" for t, v in sorted(k["topics"].items()) if v["records"]
        )
        lines.append(
            f"| {r['clients']:,} | {k['seconds']:.1f} | {k['records']:,} "
            f"| {k['records_per_s']:.1f} | {k['bytes']:,} | {k['bytes_per_s'] / 1e3:.1f} k "
            f"| {topics} |"
        )
    for r in result["runs"]:
        if "skipped" in r:
            lines.append(f"\n{r['clients']:,} clients: skipped ({r['skipped']}).")
    t = result["targets"]
    at = [r for r in rows if r["clients"] == t["latency_clients"]]
    lines += ["", "Targets:"]
    for r in at:
        total = r["latency"]["total"]
        verdict = "met" if total <= t["latency_s"] else f"MISSED by {total - t['latency_s']:.1f} s"
        lines.append(
            f"- latency after the last update at {r['clients']:,} clients: {total:.2f} s "
            f"(target < {t['latency_s']:g} s: {verdict})."
        )
    if not at:
        lines.append(f"- latency at {t['latency_clients']:,} clients: not measured in this run.")
    if result["flat_ratio"]:
        first, last = rows[0]["clients"], rows[-1]["clients"]
        for role, ratio in result["flat_ratio"].items():
            verdict = "met" if ratio <= t["flat_ratio"] else "MISSED"
            lines.append(
                f"- {role} peak RSS at {last:,} over {first:,} clients: {ratio:.2f}x "
                f"(target <= {t['flat_ratio']}x: {verdict})."
            )
    mode = "quick (`--quick`)" if result["quick"] else "full"
    lines += [
        "",
        f"Run: {mode}, {machine['timestamp']}, {machine['cpu_count']} cores, "
        f"{machine['memory_total_mib']:,} MiB RAM, load average at start "
        f"{machine.get('loadavg', ['?'])[0]}.",
    ]
    return "\n".join(lines)


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=["host"])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("clients")
    parser.add_argument("fan_in", type=int)
    parser.add_argument("threads", type=int)
    args = parser.parse_args(argv)
    sizes = [int(v) for v in args.clients.split(",")]
    procstat.emit(host(args.workdir, sizes, args.fan_in, args.threads))


if __name__ == "__main__":
    main()
