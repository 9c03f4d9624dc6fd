"""Round latency on the local platform (last 2xx -> committed model), against Flower's
aggregate_arrayrecords on the same updates in memory, with peak RSS and CPU-seconds per GB.

One host process (a child of run.py) uses a real Kafka broker (microfl.local.kafka) and, for
each configuration (N clients x P float32 parameters), a fresh LocalRuntime (the manifests of
knative/, a FileStore in the work directory) and a job of min_clients = N. A load generator
process (loadgen.py) posts the N updates over HTTP from a thread pool; the round seals when the
last one is stored.

- latency = the round record's committed_at - the time the last 2xx arrived; the seal's
  sealed_at when there is one, and the tree nodes the aggregation wrote after that 2xx (file
  mtimes under rounds/{r}/nodes/) split it;
- Flower: in a fresh process, the N updates the record includes are loaded from the store into
  Flower RecordDicts and `flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords` is
  timed on them in memory (and a plain numpy float64 weighted mean), in the same run, so that
  latency / Flower is a ratio of figures measured side by side (needs flwr: the `bench` extra);
- peak RSS = VmHWM of every function process, sampled every SAMPLE s so that instances that
  scale down are counted too; CPU seconds per process during the round, and the functions'
  total per GB of updates;
- Kafka = records and bytes on the platform topics between just before the first post and just
  after the commit.

Instances start from zero as the manifests say (min-scale 0, unless a Service keeps some warm):
cold starts are inside the latency. Each configuration's store is deleted before the next."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import report

__all__ = ["NAME", "default_workdir", "markdown", "run", "targets"]

NAME = "round_latency"
# N x P; flower: also time Flower's aggregate_arrayrecords on the same updates.
PLAN = (
    {"clients": 1000, "params": 1_000_000, "flower": True},
    {"clients": 100, "params": 100_000, "flower": False},
    {"clients": 10_000, "params": 100_000, "flower": False},
)
QUICK_PLAN = (
    {"clients": 50, "params": 1_000_000, "flower": True},
    {"clients": 20, "params": 100_000, "flower": False},
    {"clients": 200, "params": 100_000, "flower": False},
)
FAN_IN = 10
THREADS = 16
SAMPLE = 0.25
IDLE_WINDOW = 600.0  # instances stay for the whole round, so their VmHWM can be read at the end
COMMIT_TIMEOUT = 600.0  # seconds after the last post; a round slower than that is reported
FLOWER_TIMEOUT = 1800.0
# Targets of issue 15: (clients, params) -> seconds from the last 2xx to the committed model.
TARGET_LATENCY = {(1000, 1_000_000): 1.0, (10_000, 100_000): 2.0}
TARGET_FLOWER = 0.25  # latency over Flower's aggregate_arrayrecords, at the flower rows
TARGET_FLAT = 1.5  # peak RSS of aggregate and finalize at the largest N over the smallest, same P
FLAT_ROLES = ("aggregate", "finalize")
ROLES = ("ingest", "finalize", "aggregate")
HERE = Path(__file__).resolve().parent


def parse_plan(clients: tuple[Any, ...] | None, quick: bool) -> list[dict[str, Any]]:
    """The plan from run.py's --clients: items "N" (at 1M parameters) or "NxP" (P may end in k
    or M), a trailing "+f" also timing Flower; the default PLAN (QUICK_PLAN) without."""
    if not clients:
        return [dict(step) for step in (QUICK_PLAN if quick else PLAN)]
    plan = []
    for item in clients:
        text = str(item).strip()
        match = re.fullmatch(r"(\d+)(?:x(\d+)([kM]?))?(\+f)?", text)
        if not match:
            raise ValueError(f"round_latency: {text!r} is not N, NxP or NxP+f (e.g. 1000x1M+f)")
        params = int(match[2] or 1) * {"": 1, "k": 1000, "M": 1_000_000}[match[3] or "M"]
        plan.append({"clients": int(match[1]), "params": params, "flower": bool(match[4])})
    return plan


def run(
    quick: bool = False,
    workdir: Path | None = None,
    clients: tuple[Any, ...] | None = None,
    fan_in: int = FAN_IN,
    threads: int = THREADS,
) -> dict[str, Any]:
    plan = parse_plan(clients, quick)
    tmp = Path(tempfile.mkdtemp(prefix="microfl-rounds-", dir=workdir or default_workdir()))
    try:
        result = procstat.run_step(
            Path(__file__), "host", str(tmp), json.dumps(plan), str(fan_in), str(threads)
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = [r for r in result["runs"] if "skipped" not in r]
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "plan": plan,
            "fan_in": fan_in,
            "threads": threads,
            "store": "FileStore on the work directory's disk",
            "kafka": "1 KRaft node (microfl.local.kafka)",
            "manifests": "knative/ (a consumer group of its own per run)",
        },
        "runs": result["runs"],
        "flat_ratio": _flat(rows),
        "targets": {
            "latency_s": {f"{n}x{p}": s for (n, p), s in TARGET_LATENCY.items()},
            "flower_ratio": TARGET_FLOWER,
            "flat_ratio": TARGET_FLAT,
        },
        "within_target": all(t["met"] for t in _targets(result["runs"], _flat(rows))),
    }


def _flat(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model size with two or more N: peak RSS at the largest N over the smallest."""
    out: dict[str, dict[str, Any]] = {}
    for params in sorted({r["params"] for r in rows}):
        same = sorted((r for r in rows if r["params"] == params), key=lambda r: r["clients"])
        if len(same) < 2:
            continue
        first, last = same[0], same[-1]
        out[str(params)] = {
            "clients": [first["clients"], last["clients"]],
            **{
                role: last["peak_mib"][role] / first["peak_mib"][role]
                for role in FLAT_ROLES
                if first["peak_mib"].get(role) and last["peak_mib"].get(role)
            },
        }
    return out


def default_workdir() -> Path:
    """The repository's disk (the updates of 1,000 clients x 1M are 4 GB; /tmp may be small)."""
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
            try:
                runs.append(_round(workdir, kafka, step, fan_in, threads))
            except Exception as exc:  # noqa: BLE001  # the other rows still count; said why
                procstat.log(NAME, f"{step}: failed: {type(exc).__name__}: {exc}")
                runs.append({**step, "skipped": f"failed: {type(exc).__name__}: {exc}"})
    return {"runs": runs}


def _round(
    workdir: Path, kafka: Any, step: dict[str, Any], fan_in: int, threads: int
) -> dict[str, Any]:
    import kafka_meter
    import localplat
    import synth

    from microfl.jobs import JobSpec, create_job, model_key
    from microfl.local import runtime as runtime_module
    from microfl.local.reference import TOLERANCE, fedavg_error
    from microfl.rounds import nodes_prefix, record_key, seal_key
    from microfl.serde import json_from_bytes, tensors_from_safetensors, tensors_to_safetensors
    from microfl.store import FileStore

    n, params = step["clients"], step["params"]
    model_bytes = params * 4
    need = n * (model_bytes + 4096) * 1.05 + math.ceil(n / fan_in) * model_bytes * 4 + 2e9
    free = shutil.disk_usage(workdir).free
    if free < need:
        procstat.log(NAME, f"N={n}: skipped, needs {need / 1e9:.1f} GB free, has {free / 1e9:.1f}")
        return {**step, "skipped": f"needs {need / 1e9:.1f} GB free on {workdir}"}
    root = workdir / f"store-{n}-{params}"
    store = FileStore(root)
    base = synth.model(params, 0)
    job = f"round-{n}-{params}"
    spec = JobSpec.for_model(
        job, base, rounds=1, min_clients=n, fan_in=fan_in, round_timeout=3600.0,
        created_at=time.time(),
    )  # fmt: skip
    create_job(store, spec, tensors_to_safetensors(base))
    secret = secrets.token_urlsafe(24)
    tag = f"{n}-{params}-{secrets.token_hex(3)}"
    runtime = runtime_module.LocalRuntime(
        store.url,
        kafka.bootstrap,
        secret,
        workdir / f"runtime-{tag}",
        manifests=localplat.edit_manifests(workdir / f"knative-{tag}", {}, group=tag),
        idle_window=IDLE_WINDOW,
    )
    runtime.start()
    flower: dict[str, Any] | None = None
    running = True
    try:
        topics = kafka_meter.platform_topics()
        before = kafka_meter.watermarks(kafka.bootstrap, topics)
        sampled = localplat.Sampled(runtime, kafka.pids(), SAMPLE).start()
        procstat.log(NAME, f"N={n} x {params:,}: posting {n} updates of {model_bytes / 1e6:.1f} MB")
        started = time.time()
        clients = localplat.loadgen(runtime.ingest_url, job, n, params, threads, secret)
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
        last = float(clients["last_202"])
        written = sorted(os.stat(root / key).st_mtime for key in store.list(nodes_prefix(job, 1)))
        model, _ = tensors_from_safetensors(store.read(model_key(job, 1)) or b"")
        error = fedavg_error(model, synth.Updates(base, n, 1).fedavg())
        runtime.stop()  # the platform's processes are gone before Flower's are measured
        running = False
        if step.get("flower"):
            procstat.log(NAME, f"N={n}:   Flower aggregate_arrayrecords on the same updates")
            flower = _flower(root, job, record.get("included", []))
    finally:
        if running:
            runtime.stop()
        shutil.rmtree(root, ignore_errors=True)
    committed = float(record["committed_at"])
    duration = committed - started
    traffic = kafka_meter.traffic(kafka.bootstrap, before, after)
    tree = [t for t in written if t >= last]
    gb = n * model_bytes / 1e9
    function_cpu = sum(seen["cpu_s"].get(role, 0.0) for role in ROLES)
    row = {
        **step,
        "fan_in": fan_in,
        "post": clients,
        "latency": {
            "total": committed - last,
            "to_seal": float(seal["sealed_at"]) - last if "sealed_at" in seal else None,
            "aggregation_objects_after_last_2xx": len(tree),
            "aggregation_objects_before": len(written) - len(tree),
            "first_object_after": tree[0] - last if tree else None,
            "last_object_to_commit": committed - tree[-1] if tree else None,
            "observed": seen_at - last,
        },
        "round_seconds": duration,
        "included": len(record.get("included", [])),
        "excluded": len(record.get("excluded", [])),
        "max_relative_error": error,
        **seen,
        "delivered": _drained(sampled.progress, last),
        "cpu_s": {**seen["cpu_s"], "load generator": clients.get("cpu_s")},
        "update_gb": gb,
        "function_cpu_s_per_gb": function_cpu / gb,
        "aggregation_cpu_s_per_gb": sum(seen["cpu_s"].get(r, 0.0) for r in FLAT_ROLES) / gb,
        "flower": flower,
        "kafka": {
            **traffic,
            "seconds": duration,
            "records_per_s": traffic["records"] / duration,
            "bytes_per_s": traffic["bytes"] / duration,
        },
    }
    ratio = (
        f"; Flower aggregate_arrayrecords {flower['arrayrecords_s']:.2f} s"
        if flower and "arrayrecords_s" in flower
        else ""
    )
    procstat.log(
        NAME,
        f"N={n} x {params:,}:   latency {row['latency']['total']:.2f} s after the last 2xx"
        f"{ratio}; peak MiB {row['peak_mib']}; {row['function_cpu_s_per_gb']:.1f} function "
        f"CPU-s/GB; error {error:.1e}",
    )
    if row["included"] != n or error > TOLERANCE:
        raise RuntimeError(f"N={n}: the round included {row['included']} updates, error {error}")
    return row


def _extra_path() -> None:
    """MICROFL_BENCH_DEPS: a folder with flwr (pip install --target) put at the END of sys.path,
    so that it adds flwr without shadowing the virtualenv's packages."""
    extra = os.environ.get("MICROFL_BENCH_DEPS")
    if extra and extra not in sys.path:
        sys.path.append(extra)


def _flower(root: Path, job: str, included: list[str]) -> dict[str, Any]:
    """Flower's aggregate_arrayrecords (and a numpy weighted mean) on the included updates, in
    memory, in a fresh process; {"skipped": why} without flwr."""
    import importlib.util

    _extra_path()
    if importlib.util.find_spec("flwr") is None:
        return {"skipped": "flwr is not installed (pip install -e '.[bench]')"}
    listing = root / "flower-clients.json"
    listing.write_text(json.dumps(included))
    return procstat.run_step(
        Path(__file__), "flower", str(root), job, str(listing), timeout=FLOWER_TIMEOUT
    )


def flower_step(root: Path, job: str, listing: Path) -> dict[str, Any]:
    """The child: load the updates into RecordDicts, then time aggregate_arrayrecords on them,
    and a float64 numpy weighted mean of the same arrays."""
    _extra_path()
    import numpy as np
    from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
    from safetensors import safe_open

    from microfl.rounds import update_key

    clients = json.loads(listing.read_text())
    start = time.perf_counter()
    items, plain = [], []
    for client in clients:
        with safe_open(str(root / update_key(job, 1, client)), framework="np") as f:
            n = int(f.metadata()["num_examples"])
            arrays = {name: f.get_tensor(name) for name in sorted(f.keys())}
        plain.append((arrays, n))
        record = ArrayRecord({k: Array(a) for k, a in arrays.items()})
        items.append(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": n})}))
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    aggregate_arrayrecords(items, "num-examples")
    flower_s = time.perf_counter() - start
    start = time.perf_counter()
    total = float(sum(n for _, n in plain))
    mean = {k: np.zeros(a.shape, np.float64) for k, a in plain[0][0].items()}
    for arrays, n in plain:
        for k, a in arrays.items():
            mean[k] += a * (n / total)
    numpy_s = time.perf_counter() - start
    return {
        "clients": len(clients),
        "load_s": load_s,
        "arrayrecords_s": flower_s,
        "numpy_mean_s": numpy_s,
        "peak_mib": procstat.status_mib("VmHWM"),
    }


def _drained(progress: list[tuple[float, dict[str, int]]], last: float) -> dict[str, Any]:
    """Events each event source had delivered when the last 2xx arrived, and when (seconds
    after it) it delivered its last event of the round."""
    at_last: dict[str, int] = {}
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


def _targets(
    runs: list[dict[str, Any]], flat: dict[str, Any], current: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    import baseline

    old = (baseline.load(NAME, current) or {}).get("runs", [])

    def was(n: int, p: int, get: Any) -> str:
        for r in old:
            if "skipped" not in r and r["clients"] == n and r.get("params", 1_000_000) == p:
                value = get(r)
                if value is not None and r.get("variant", "as is") == "as is":
                    return f"; before: {value}"
        return ""

    rows = [r for r in runs if "skipped" not in r]
    out = []
    for (n, p), limit in TARGET_LATENCY.items():
        at = [r for r in rows if r["clients"] == n and r["params"] == p]
        label = f"last 2xx -> committed model <= {limit:g} s, {n:,} clients x {p / 1e6:g}M"
        if not at:
            why = [r["skipped"] for r in runs if r["clients"] == n and r.get("params") == p] or [
                "not measured in this run"
            ]
            out.append({"target": label, "measured": why[0][:160], "met": False})
        for r in at:
            total = r["latency"]["total"]
            out.append(
                {
                    "target": label,
                    "measured": f"{total:.2f} s"
                    + was(n, p, lambda o: f"{o['latency']['total']:.2f} s"),
                    "met": total <= limit,
                }
            )
    for r in rows:
        fl = r.get("flower") or {}
        if "arrayrecords_s" not in fl:
            continue
        ratio = r["latency"]["total"] / fl["arrayrecords_s"]
        out.append(
            {
                "target": f"latency <= {TARGET_FLOWER}x Flower aggregate_arrayrecords in memory,"
                f" {r['clients']:,} x {r['params'] / 1e6:g}M, same run",
                "measured": f"{ratio:.2f}x ({r['latency']['total']:.2f} s vs "
                f"{fl['arrayrecords_s']:.2f} s)",
                "met": ratio <= TARGET_FLOWER,
            }
        )
    for params, f in flat.items():
        lo, hi = f["clients"]
        for role in FLAT_ROLES:
            if role in f:
                out.append(
                    {
                        "target": f"{role} peak RSS within {TARGET_FLAT}x, {hi:,} vs {lo:,} "
                        f"clients x {int(params) / 1e6:g}M",
                        "measured": f"{f[role]:.2f}x",
                        "met": f[role] <= TARGET_FLAT,
                    }
                )
    for r in rows:
        out.append(
            {
                "target": f"function CPU-seconds per GB of updates (reported), {r['clients']:,} "
                f"x {r['params'] / 1e6:g}M",
                "measured": f"{r['function_cpu_s_per_gb']:.1f} CPU-s/GB (aggregate + finalize "
                f"{r['aggregation_cpu_s_per_gb']:.1f})"
                + was(
                    r["clients"],
                    r["params"],
                    lambda o: (
                        f"{o['function_cpu_s_per_gb']:.1f}"
                        if "function_cpu_s_per_gb" in o
                        else None
                    ),
                ),
                "met": True,
            }
        )
    return out


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return _targets(result["runs"], result["flat_ratio"], result)


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = result["config"]
    rows = [r for r in result["runs"] if "skipped" not in r]
    lines = [
        "## Round latency, Flower, memory and CPU on the local platform",
        "",
        f"A real Kafka broker and the three functions as processes ({cfg['manifests']}), "
        f"{cfg['store']}; one job per row with min_clients = N, fan-in {cfg['fan_in']}; a load "
        f"generator process posts the N updates over HTTP with {cfg['threads']} threads. "
        "**Latency** is the round record's committed_at minus the arrival of the last 2xx; "
        "*aggregation objects* are the tree nodes (leaves and inner nodes) the aggregation wrote "
        "before and after that 2xx. **Flower** is `aggregate_arrayrecords` on the same "
        "updates in memory, timed in a fresh process after the round, same run. Peak RSS is the "
        f"largest VmHWM of any process of the role, sampled every {SAMPLE} s; instances start "
        "as the manifests say, so cold starts are inside the latency.",
        "",
        "| clients x params | posting s | updates/s | **latency s** | to seal | objects "
        "before / after | 1st after | last to commit | events delivered after | Flower s "
        "| latency / Flower | numpy mean s | max rel. error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
        "| ---: |",
    ]
    for r in rows:
        lat, post, fl = r["latency"], r["post"], r.get("flower") or {}
        d = r["delivered"]
        after = sum(d["final"].values()) - sum(d["at_last_202"].values())
        has = "arrayrecords_s" in fl
        lines.append(
            f"| {_size(r)} | {post['seconds']:.1f} | {post['updates_per_s']:.1f} "
            f"| **{lat['total']:.2f}** | {_f(lat['to_seal'])} "
            f"| {lat['aggregation_objects_before']} / {lat['aggregation_objects_after_last_2xx']}"
            f" | {_f(lat['first_object_after'])} | {_f(lat['last_object_to_commit'])} | {after} "
            f"| {_f(fl.get('arrayrecords_s'))} "
            f"| {_f(lat['total'] / fl['arrayrecords_s']) if has else '-'} "
            f"| {_f(fl.get('numpy_mean_s'))} | {r['max_relative_error']:.1e} |"
        )
    lines += [
        "",
        "Peak RSS (MiB, largest process of the role), instances, and CPU seconds during the "
        "round; CPU-s/GB = CPU seconds of the three functions per GB (1e9 B) of updates:",
        "",
        "| clients x params | ingest | finalize | aggregate | instances i/f/a | CPU s: ingest "
        "| finalize | aggregate | Kafka | runtime host | **function CPU-s/GB** | aggregate + "
        "finalize CPU-s/GB |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        pk, cpu, inst = r["peak_mib"], r["cpu_s"], r["instances"]
        cells = [_size(r)] + [_f(pk.get(role), 0) for role in ROLES]
        cells.append("/".join(str(inst.get(role, 0)) for role in ROLES))
        cells += [_f(cpu.get(role), 1) for role in (*ROLES, "kafka")]
        cells += [_f(cpu.get("runtime host (proxies, dispatchers)"), 1)]
        cells += [f"**{r['function_cpu_s_per_gb']:.1f}**", f"{r['aggregation_cpu_s_per_gb']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "| clients x params | round s | Kafka records | records/s | bytes | per topic |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        k = r["kafka"]
        topics = ", ".join(
            f"{t} {v['records']}" for t, v in sorted(k["topics"].items()) if v["records"]
        )
        lines.append(
            f"| {_size(r)} | {k['seconds']:.1f} | {k['records']:,} | {k['records_per_s']:.1f} "
            f"| {k['bytes']:,} | {topics} |"
        )
    for r in result["runs"]:
        if "skipped" in r:
            lines.append(f"\n{_size(r)}: skipped ({r['skipped']}).")
    lines += ["", "Targets of issue 15:"]
    for t in _targets(result["runs"], result["flat_ratio"], {"machine": machine}):
        verdict = "met" if t["met"] else "MISSED"
        lines.append(f"- {t['target']}: {t['measured']} ({verdict}).")
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


def _size(r: dict[str, Any]) -> str:
    return f"{r['clients']:,} x {r.get('params', 1_000_000) / 1e6:g}M"


def _f(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    h = sub.add_parser("host")
    h.add_argument("workdir", type=Path)
    h.add_argument("plan", help='JSON: [{"clients": N, "params": P, "flower": bool}]')
    h.add_argument("fan_in", type=int)
    h.add_argument("threads", type=int)
    f = sub.add_parser("flower")
    f.add_argument("root", type=Path)
    f.add_argument("job")
    f.add_argument("listing", type=Path)
    args = parser.parse_args(argv)
    if args.step == "host":
        procstat.emit(host(args.workdir, json.loads(args.plan), args.fan_in, args.threads))
    else:
        procstat.emit(flower_step(args.root, args.job, args.listing))


if __name__ == "__main__":
    main()
