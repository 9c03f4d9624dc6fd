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

import json
import math
import os
import secrets
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import report

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "round_latency"
CLIENTS = (100, 1000, 5000)
QUICK_CLIENTS = (50,)
PATCHED = (100, 1000)  # also run with the changes of patched.py (localplat.patches)
QUICK_PATCHED = (50,)
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
    plan = [{"clients": n, "variant": "as is"} for n in sizes]
    plan += [
        {"clients": n, "variant": "patched"}
        for n in (QUICK_PATCHED if quick else PATCHED)
        if n in sizes
    ]
    tmp = Path(tempfile.mkdtemp(prefix="microfl-rounds-", dir=workdir or _default_workdir()))
    try:
        result = procstat.run_step(
            Path(__file__), "host", str(tmp), json.dumps(plan), str(fan_in), str(threads)
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [r for r in result["runs"] if "skipped" not in r and r["variant"] == "as is"]
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
            "manifests": "knative/ (min-scale 0; a consumer group of its own per run)",
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


def host(workdir: Path, plan: list[dict[str, Any]], fan_in: int, threads: int) -> dict[str, Any]:
    import localplat

    runs = []
    with localplat.kafka(workdir) as kafka:
        procstat.log(NAME, f"Kafka at {kafka.bootstrap}")
        for step in plan:
            with localplat.patches(step["variant"] == "patched"):
                row = _round(workdir, kafka, step["clients"], fan_in, threads, step["variant"])
            runs.append({**row, "variant": step["variant"]})
    return {"runs": runs}


def _round(
    workdir: Path, kafka: Any, n: int, fan_in: int, threads: int, variant: str
) -> dict[str, Any]:
    import kafka_meter
    import localplat
    import synth

    from microfl.jobs import JobSpec, create_job, model_key, partials_prefix, record_key, seal_key
    from microfl.local import runtime as runtime_module
    from microfl.local.reference import TOLERANCE, fedavg_error
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
    tag = f"{n}-{variant.replace(' ', '-')}-{secrets.token_hex(3)}"
    runtime = runtime_module.LocalRuntime(
        store.url,
        kafka.bootstrap,
        secret,
        workdir / f"runtime-{tag}",
        manifests=localplat.edit_manifests(workdir / f"knative-{tag}", {}, group=tag),
        idle_window=IDLE_WINDOW,
    )
    runtime.start()
    try:
        topics = kafka_meter.platform_topics()
        before = kafka_meter.watermarks(kafka.bootstrap, topics)
        sampled = localplat.Sampled(runtime, kafka.pids(), SAMPLE).start()
        procstat.log(NAME, f"N={n} ({variant}): posting {n} updates of {model_bytes / 1e6:.0f} MB")
        started = time.time()
        clients = localplat.loadgen(runtime.ingest_url, job, n, PARAMS, threads, secret)
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
        seen = sampled.stop()
        after = kafka_meter.watermarks(kafka.bootstrap, topics)
        record = json_from_bytes(store.read(record_key(job, 1)) or b"{}")
        seal = json_from_bytes(store.read(seal_key(job, 1)) or b"{}")
        partial_times = sorted(
            os.stat(root / key).st_mtime for key in store.list(partials_prefix(job, 1))
        )
        model, _ = tensors_from_safetensors(store.read(model_key(job, 1)) or b"")
        error = fedavg_error(model, synth.Updates(base, n, 1).fedavg())
    finally:
        runtime.stop()
        shutil.rmtree(root, ignore_errors=True)
    committed = float(record["committed_at"])
    last = float(clients["last_202"])
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
        **seen,
        "delivered": _drained(sampled.progress, last),
        "cpu_s": {**seen["cpu_s"], "load generator": clients.get("cpu_s")},
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
    if row["included"] != n or error > TOLERANCE:
        raise RuntimeError(f"N={n}: the round included {row['included']} updates, error {error}")
    return row


def _drained(progress: list[tuple[float, dict[str, int]]], last: float) -> dict[str, Any]:
    """Events each KafkaSource had delivered when the last 202 arrived, and when (seconds after
    it) it delivered its last event of the round."""
    at_last = {}
    done: dict[str, float] = {}
    final = progress[-1][1] if progress else {}
    for stamp, delivered in progress:
        if stamp <= last:
            at_last = delivered
        for group, count in delivered.items():
            if count == final.get(group) and group not in done:
                done[group] = stamp - last
    return {"at_last_202": at_last, "final": final, "last_delivery_after_s": done}


# --- report ------------------------------------------------------------------------------------


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    t = result["targets"]
    out = []
    for r in result["runs"]:
        if "skipped" in r or r["clients"] != t["latency_clients"]:
            continue
        total = r["latency"]["total"]
        out.append(
            {
                "target": f"round latency after the last update < {t['latency_s']:g} s, "
                f"{r['clients']:,} clients x 1M ({r['variant']})",
                "measured": f"{total:.2f} s",
                "met": total < t["latency_s"],
            }
        )
    plain = [r for r in result["runs"] if "skipped" not in r and r["variant"] == "as is"]
    for role, ratio in result["flat_ratio"].items():
        out.append(
            {
                "target": f"{role} peak RSS flat in clients (<= {t['flat_ratio']}x, "
                f"{plain[0]['clients']:,} to {plain[-1]['clients']:,})",
                "measured": f"{ratio:.2f}x ({plain[0]['peak_mib'][role]:.0f} -> "
                f"{plain[-1]['peak_mib'][role]:.0f} MiB)",
                "met": ratio <= t["flat_ratio"],
            }
        )
    return out


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
        "inside the latency. *Committed by sweep*: finalize had not yet been delivered the "
        "round's events when the PingSource's sweep (every 60 s here) found every partial and "
        "committed; *event*: the partial.ready event did.",
        "",
        "| code | clients | chunks | posting s | updates/s | p50 / p95 ms | **latency s** "
        "| to seal | seal to 1st partial | partials | last partial to commit | finalize events "
        "not yet delivered at last 202 | committed by | max rel. error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| --- | ---: |",
    ]
    for r in rows:
        lat, post = r["latency"], r["post"]
        left = r["kafka"]["topics"]["microfl.finalize"]["records"] - _finalize(
            r["delivered"]["at_last_202"]
        )
        by = (
            "event"
            if _finalize(r["delivered"]["final"]) >= left + _finalize(r["delivered"]["at_last_202"])
            else "sweep"
        )
        lines.append(
            f"| {r['variant']} | {r['clients']:,} | {r['chunks']} | {post['seconds']:.1f} "
            f"| {post['updates_per_s']:.1f} | {post['p50_s'] * 1e3:.0f} / "
            f"{post['p95_s'] * 1e3:.0f} | **{lat['total']:.2f}** | {lat['to_seal']:.2f} "
            f"| {_f(lat['seal_to_first_partial'])} | {_f(lat['partials'])} "
            f"| {_f(lat['last_partial_to_commit'])} | {left} | {by} "
            f"| {r['max_relative_error']:.1e} |"
        )
    lines += [
        "",
        "Peak RSS (MiB, largest process of the role), instances, and CPU seconds used during "
        "the round:",
        "",
        "| code | clients | ingest | finalize | aggregate | instances i/f/a | CPU s: ingest "
        "| finalize | aggregate | Kafka | runtime host | load generator |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        pk, cpu, inst = r["peak_mib"], r["cpu_s"], r["instances"]
        cells = [r["variant"], f"{r['clients']:,}"]
        cells += [_f(pk.get(role), 0) for role in ROLES]
        cells.append("/".join(str(inst.get(role, 0)) for role in ROLES))
        cells += [_f(cpu.get(role), 1) for role in (*ROLES, "kafka")]
        cells += [_f(cpu.get("runtime host (proxies, dispatchers)"), 1)]
        cells += [_f(cpu.get("load generator"), 1)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Kafka broker throughput during the round (the paper's software metric): records and "
        "bytes (key + value + headers) produced to the platform topics from the first post to "
        "the commit, over that time.",
        "",
        "| code | clients | round s | records | records/s | bytes | bytes/s "
        "| per topic (records) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        k = r["kafka"]
        topics = ", ".join(
            f"{t} {v['records']}" for t, v in sorted(k["topics"].items()) if v["records"]
        )
        lines.append(
            f"| {r['variant']} | {r['clients']:,} | {k['seconds']:.1f} | {k['records']:,} "
            f"| {k['records_per_s']:.1f} | {k['bytes']:,} | {k['bytes_per_s'] / 1e3:.1f} k "
            f"| {topics} |"
        )
    for r in result["runs"]:
        if "skipped" in r:
            lines.append(f"\n{r['clients']:,} clients: skipped ({r['skipped']}).")
    t = result["targets"]
    at = [r for r in rows if r["clients"] == t["latency_clients"]]
    lines += ["", "Targets (code as is; *patched* rows show what the changes would give):"]
    for r in at:
        total = r["latency"]["total"]
        verdict = "met" if total <= t["latency_s"] else f"MISSED by {total - t['latency_s']:.1f} s"
        lines.append(
            f"- latency after the last update at {r['clients']:,} clients ({r['variant']}): "
            f"{total:.2f} s (target < {t['latency_s']:g} s: {verdict})."
        )
    if not at:
        lines.append(f"- latency at {t['latency_clients']:,} clients: not measured in this run.")
    if result["flat_ratio"]:
        plain = [r for r in rows if r["variant"] == "as is"]
        first, last = plain[0]["clients"], plain[-1]["clients"]
        for role, ratio in result["flat_ratio"].items():
            verdict = "met" if ratio <= t["flat_ratio"] else "MISSED"
            lines.append(
                f"- {role} peak RSS at {last:,} over {first:,} clients: {ratio:.2f}x "
                f"(target <= {t['flat_ratio']}x: {verdict})."
            )
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


def _finalize(delivered: dict[str, int]) -> int:
    """Events the finalize KafkaSource (consumer group microfl-finalize[-run]) delivered."""
    return sum(v for k, v in delivered.items() if k.startswith("microfl-finalize"))


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


if __name__ == "__main__":
    procstat.step_main(host)
