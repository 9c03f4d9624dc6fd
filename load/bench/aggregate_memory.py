"""Peak memory of aggregate and finalize as the number of clients grows (design invariant 4:
memory bounded by fan-in x model size, independent of the number of clients).

For each N a FileStore in a temp dir gets a job, N distinct client updates and the seal of
round 1; then fresh processes (worker.py) build every node of the round's aggregation tree one
after another (aggregate.build_node: the leaves, then the inner nodes), commit the round, and
check the model against a numpy FedAvg of the updates. This process only orchestrates and
never imports numpy, so the children's peak RSS is their own."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import procstat
import report

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "aggregate_memory"
CLIENTS = (10, 100, 1000)
QUICK_CLIENTS = (10, 100)
FAN_IN = 10
SEED = 20240601
TARGET_RATIO = 1.5  # peak RSS at the largest N over peak RSS at the smallest N
JOB = "bench"
WORKER = Path(__file__).resolve().parent / "worker.py"
PHASES = ("aggregate", "finalize")


def _step(step: str, root: Path, *options: str) -> dict[str, Any]:
    """Run one worker step in a fresh process; its JSON answer."""
    return procstat.run_step(WORKER, step, str(root), JOB, *options)


def _one(n: int, root: Path) -> dict[str, Any]:
    print(f"[{NAME}] N={n}: writing the job, {n} updates and the seal", flush=True)
    made = _step(
        "generate", root, "--clients", str(n), "--fan-in", str(FAN_IN), "--seed", str(SEED)
    )
    print(
        f"[{NAME}] N={n}:   {n} updates of {made['model_bytes'] / 2**20:.2f} MiB in "
        f"{made['seconds']:.1f} s; {made['leaves']} leaves of {FAN_IN}, {made['nodes']} nodes",
        flush=True,
    )
    row: dict[str, Any] = {"clients": n, "nodes": made["nodes"], "generate": made}
    for phase in PHASES:
        print(f"[{NAME}] N={n}: {phase} (fresh process)", flush=True)
        got = _step(phase, root)
        print(
            f"[{NAME}] N={n}:   peak {got['peak_mib']:.1f} MiB, baseline "
            f"{got['baseline_mib']:.1f} MiB, {got['seconds']:.2f} s",
            flush=True,
        )
        hwm = got.get("vm_hwm_mib")
        if hwm is not None and got["peak_mib"] > hwm + 1:
            print(
                f"[{NAME}] warning: ru_maxrss {got['peak_mib']:.1f} MiB exceeds the child's "
                f"own VmHWM {hwm:.1f} MiB (inherited from the parent?)",
                flush=True,
            )
        row[phase] = got
    print(f"[{NAME}] N={n}: checking model 1 against a numpy FedAvg", flush=True)
    row["verify"] = _step("verify", root)
    print(
        f"[{NAME}] N={n}:   max relative error {row['verify']['max_relative_error']:.1e}",
        flush=True,
    )
    return row


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    sizes = QUICK_CLIENTS if quick else CLIENTS
    tmp = Path(tempfile.mkdtemp(prefix="microfl-bench-", dir=workdir))
    rows = []
    try:
        for n in sizes:
            root = tmp / f"clients-{n}"
            rows.append(_one(n, root))
            shutil.rmtree(root)  # at most one N's updates on disk at a time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first, last = rows[0], rows[-1]
    ratios = {
        phase: {
            "peak": last[phase]["peak_mib"] / first[phase]["peak_mib"],
            "work": last[phase]["work_mib"] / first[phase]["work_mib"],
        }
        for phase in PHASES
    }
    model = first["generate"]
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "clients": list(sizes),
            "fan_in": FAN_IN,
            "seed": SEED,
            "params": model["params"],
            "model_mib": model["model_bytes"] / 2**20,
            "dtype": "float32",
            "store": "FileStore",
            "bus": "MemoryBus",
        },
        "runs": rows,
        "ratios": ratios,
        "target_ratio": TARGET_RATIO,
        "within_target": all(r["peak"] <= TARGET_RATIO for r in ratios.values()),
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    first, last = result["config"]["clients"][0], result["config"]["clients"][-1]
    return [
        {
            "target": f"{phase} peak RSS flat in clients, in process (<= "
            f"{result['target_ratio']}x, {first:,} to {last:,})",
            "measured": f"{ratio['peak']:.2f}x",
            "met": ratio["peak"] <= result["target_ratio"],
        }
        for phase, ratio in result["ratios"].items()
    ]


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = result["config"]
    model_mib = cfg["model_mib"]
    lines = [
        "## Aggregate and finalize memory vs number of clients",
        "",
        f"Invariant 4: memory bounded by fan-in x model size, whatever the number of clients. "
        f"Model: {cfg['params']:,} float32 parameters ({model_mib:.2f} MiB), fan-in "
        f"{cfg['fan_in']} (fan-in x model = {cfg['fan_in'] * model_mib:.1f} MiB), "
        f"{cfg['store']} on local disk. Each row is one fresh process: *aggregate* computes "
        "every node of the round's tree one after another (leaves of fan-in updates, then inner "
        "nodes), *finalize* commits the round from the top of the tree. Peak is `ru_maxrss`; "
        "baseline is the RSS after imports and numba's kernels loaded; the committed model "
        "matched a numpy "
        "FedAvg of the updates in every run.",
        "",
        "| phase | clients | tree nodes | baseline MiB | peak MiB | peak - baseline MiB "
        "| (peak - baseline) / model | wall s | max rel. error |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for phase in PHASES:
        for row in result["runs"]:
            got = row[phase]
            lines.append(
                f"| {phase} | {row['clients']} | {row.get('nodes', row.get('chunks'))} "
                f"| {got['baseline_mib']:.1f} "
                f"| {got['peak_mib']:.1f} | {got['work_mib']:.1f} "
                f"| {got['work_mib'] / model_mib:.1f}x | {got['seconds']:.2f} "
                f"| {row['verify']['max_relative_error']:.1e} |"
            )
    first, last = cfg["clients"][0], cfg["clients"][-1]
    lines += [
        "",
        f"Peak at {last} clients over peak at {first} clients (target <= "
        f"{result['target_ratio']}x):",
        "",
    ]
    for phase, ratio in result["ratios"].items():
        verdict = "within target" if ratio["peak"] <= result["target_ratio"] else "MISSED"
        lines.append(
            f"- {phase}: {ratio['peak']:.2f}x peak RSS ({verdict}), "
            f"{ratio['work']:.2f}x peak - baseline"
        )
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)
