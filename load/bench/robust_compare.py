"""Micro-FL's robust strategies (median, trimmed-mean, krum over coordinate shards) side by side
with Flower's FedMedian, FedTrimmedAvg and Krum on the same updates in the same run: time, peak
memory per instance against the job's memory budget, and whether the models are the same.

One FileStore gets N distinct updates (every client its own draw; one in ten a Byzantine update
with 100x the noise) written straight as safetensors files, hard-linked into one job per
strategy, and each job's round 1 sealed. Then, for each strategy, each step in a fresh process
(robust_steps.py; peak = VmHWM; "work" = peak - RSS after the imports):

- flower: flwr 1.42.0's own code on all N updates in memory, as its API takes them.
- microfl_instance: one aggregate instance building one coordinate shard: the peak a deployment
  sizes its instances by, against JobSpec.memory_budget.
- microfl: every shard one after another in one process, then finalize's commit: time to the
  committed model, and each shard's time (N instances in parallel take about the longest).
- verify: the committed model against Flower's (cast to float32: exact bytes, or how many ulps
  apart) and against a float64 numpy reference (Krum: the choice with float64 distances).

The equality checks in about 20 s (50 x 100k, a 4 MiB budget: 20 shards; --out keeps the full
run's results): `PYTHONPATH=functions MICROFL_BENCH_DEPS=DIR .venv/bin/python load/bench/run.py
--quick --only robust_compare --out /tmp/robust`.

flwr is not a runtime dependency: pip install -e '.[bench]', or a folder of it named by
MICROFL_BENCH_DEPS (appended to sys.path, as in round_latency)."""

from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

import procstat
import report
from robust_steps import ATTACK, BETA, BYZANTINE_EVERY, NOISE, SEED, STRATEGIES
from round_latency import _extra_path

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "robust_compare"
# (clients, parameters, the jobs' memory budget in MiB): the job's default budget at full size;
# quick runs a budget small enough that the round still has many shards.
SIZES = ((1000, 1_000_000, 256),)
QUICK_SIZES = ((50, 100_000, 4),)
FLOWER = {
    "median": "aggregate_median (FedMedian)",
    "trimmed-mean": "aggregate_trimmed_avg (FedTrimmedAvg)",
    "krum": "select_multikrum + aggregate_arrayrecords (Krum)",
}
TARGET_MEMORY = 10.0
TARGET_CLIENTS = 1000
STEPS = Path(__file__).resolve().parent / "robust_steps.py"


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    _extra_path()
    from importlib.metadata import version

    try:
        flwr_version = version("flwr")
    except Exception as exc:
        raise RuntimeError(
            "robust_compare needs flwr: pip install -e '.[bench]' (a bench extra, not a "
            "runtime dependency), or MICROFL_BENCH_DEPS=DIR with flwr in DIR"
        ) from exc
    sizes = QUICK_SIZES if quick else SIZES
    tmp = Path(tempfile.mkdtemp(prefix="microfl-robust-", dir=workdir))
    rows = []
    try:
        for n, params, budget in sizes:
            root = tmp / f"{n}x{params}"
            procstat.log(NAME, f"{n} x {params:,}: writing {n} updates")
            made = _step("generate", root, str(n), str(params), str(budget))
            procstat.log(NAME, f"  {made['gib']:.2f} GiB in {made['seconds']:.1f} s")
            for strategy in STRATEGIES:
                rows.append(_one(root, strategy, made))
            shutil.rmtree(root, ignore_errors=True)  # the updates of one size at a time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "sizes": [list(s) for s in sizes],
            "flwr": flwr_version,
            "beta": BETA,
            "byzantine_every": BYZANTINE_EVERY,
            "attack": ATTACK,
            "noise": NOISE,
            "seed": SEED,
        },
        "runs": rows,
        "targets": {"memory": TARGET_MEMORY, "clients": TARGET_CLIENTS},
        "within_target": all(t["met"] for t in targets({"runs": rows, "quick": quick})),
    }


def _one(root: Path, strategy: str, made: dict[str, Any]) -> dict[str, Any]:
    n, params = made["clients"], made["params"]
    row: dict[str, Any] = {"strategy": strategy, "clients": n, "params": params}
    steps = (
        ("flower", "flower", f"Flower {FLOWER[strategy]}", _say_flower),
        ("instance", "microfl_instance", "Micro-FL, one instance building one shard", _say_one),
        ("microfl", "microfl", "Micro-FL, every shard in one process, then the commit", _say_all),
    )
    for key, step, what, say in steps:
        procstat.log(NAME, f"{n} x {params:,} {strategy}: {what}")
        row[key] = _step(step, root, strategy)
        procstat.log(NAME, "  " + say(row[key]))
    fl, me, one = row["flower"], row["microfl"], row["instance"]
    row["verify"] = v = _step("verify", root, strategy)
    procstat.log(NAME, f"  vs Flower: {v['summary']}; {v['detail']}")
    row["ratios"] = {
        "time": fl["call_seconds"] / me["seconds"],
        "time_with_load": fl["seconds"] / me["seconds"],
        "time_parallel": fl["call_seconds"] / me["parallel_seconds"],
        "peak": fl["peak_mib"] / one["peak_mib"],
        "work": fl["work_mib"] / one["work_mib"],
    }
    return row


def _say_flower(got: dict[str, Any]) -> str:
    return (
        f"{got['call_seconds']:.2f} s (+{got['load_seconds']:.2f} s loading), peak "
        f"{got['peak_mib']:.0f} MiB, work {got['work_mib']:.0f} MiB"
    )


def _say_one(got: dict[str, Any]) -> str:
    return (
        f"{got['width']:,} coordinates: {got['seconds']:.2f} s, peak {got['peak_mib']:.0f} MiB, "
        f"work {got['work_mib']:.0f} MiB (budget {got['budget_mib']:.0f} MiB)"
    )


def _say_all(got: dict[str, Any]) -> str:
    return (
        f"{got['seconds']:.2f} s ({got['shards']} shards; in parallel about "
        f"{got['parallel_seconds']:.2f} s), peak {got['peak_mib']:.0f} MiB"
    )


def _step(step: str, root: Path, *args: str) -> dict[str, Any]:
    return procstat.run_step(STEPS, step, str(root), *args)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Memory at TARGET_CLIENTS (not in a quick run); the reference checks at every size; the
    bytes against Flower's are reported in the section, not as a target (see markdown)."""
    out = []
    for row in result["runs"]:
        one, ratio, v = row["instance"], row["ratios"], row["verify"]
        at = f"{row['clients']:,} x {row['params']:,}"
        if row["clients"] == TARGET_CLIENTS:
            out.append(
                {
                    "target": f"{row['strategy']}: one instance within the job's memory budget, "
                    + at,
                    "measured": f"{one['work_mib']:.0f} MiB above imports ({one['peak_mib']:.0f} "
                    f"MiB peak RSS) of {one['budget_mib']:.0f} MiB",
                    "met": one["work_mib"] <= one["budget_mib"],
                }
            )
            out.append(
                {
                    "target": f"{row['strategy']}: >= {TARGET_MEMORY:g}x less peak memory per "
                    f"instance than Flower's process, {at}",
                    "measured": f"{ratio['peak']:.0f}x peak RSS, {ratio['work']:.0f}x above "
                    "imports",
                    "met": ratio["peak"] >= TARGET_MEMORY,
                }
            )
        out.append(
            {
                "target": f"{row['strategy']}: model equals the float64 numpy reference"
                + (" (Krum: the exact choice)" if row["strategy"] == "krum" else "")
                + f", {at}",
                "measured": v["reference_summary"],
                "met": v["as_reference"],
            }
        )
    return out


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "## Robust strategies vs Flower (median, trimmed mean, Krum)",
        "",
        f"Same updates, same run, flwr {cfg['flwr']}: N distinct float32 updates, one in "
        f"{cfg['byzantine_every']} Byzantine ({cfg['attack']:g}x the noise), trimmed mean with "
        f"beta {cfg['beta']:g} on both sides, Krum with f = the number of Byzantine clients and "
        "m = 1. **Flower**: its own code on all N updates in memory, as its API takes them "
        "(median, trimmed mean: `flwr.server.strategy.aggregate.aggregate_median` / "
        "`aggregate_trimmed_avg`, what FedMedian / FedTrimmedAvg call, on (ndarrays, "
        "num_examples); Krum: the message API's `select_multikrum` + "
        "`aggregate_arrayrecords`, what `flwr.serverapp.strategy.Krum` calls, on RecordDicts; "
        "the legacy `aggregate_krum` loops over the N^2 pairs in Python and is left out); "
        "time of the call, in brackets with loading the safetensors files first. "
        "**Micro-FL instance**: `shards.build_shard` of one coordinate shard in a fresh "
        "process (ranged reads of its slice of every update; the width comes from the job's "
        "memory budget): what a deployment sizes an aggregate instance by. **Micro-FL all "
        "shards**: every shard one after another in one process, Krum's selection, then "
        "`finalize.commit`: time to the committed model; in brackets what N instances in "
        "parallel would take (the longest shard of each level + selection + commit). Peak = "
        "VmHWM of the process; work = peak - RSS after imports.",
        "",
        "| clients x params | strategy | Flower s | Micro-FL all shards s (parallel) | shards "
        "x width | a shard s, median / max | Flower peak / work MiB | Micro-FL instance peak / "
        "work MiB | budget MiB | less memory: peak (work) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["runs"]:
        fl, me, one, ratio = row["flower"], row["microfl"], row["instance"], row["ratios"]
        level0 = me["shard_seconds"][0]  # Krum's level 1 (a mean of m rows) takes ~0 s
        lines.append(
            f"| {row['clients']:,} x {row['params']:,} | {row['strategy']} "
            f"| {fl['call_seconds']:.2f} ({fl['seconds']:.2f}) "
            f"| {me['seconds']:.2f} ({me['parallel_seconds']:.2f}) "
            f"| {me['shards']} x {me['width']:,} "
            f"| {statistics.median(level0):.2f} / {max(level0):.2f} "
            f"| {fl['peak_mib']:.0f} / {fl['work_mib']:.0f} "
            f"| {one['peak_mib']:.0f} / {one['work_mib']:.0f} | {one['budget_mib']:.0f} "
            f"| {ratio['peak']:.0f}x ({ratio['work']:.0f}x) |"
        )
    lines += [
        "",
        "The job's memory_budget bounds the update values an instance holds: shards.layout "
        "fits two float64 copies of the (N, width) slice in it (the matrix and the copy "
        "np.partition or the centring makes; Krum's N x N matrices first), so the work above "
        "imports is the budget plus what else the instance allocates (read buffers, the "
        "result, allocator slack).",
        "",
        "Models (Micro-FL's committed model bytes vs Flower's result cast to float32, and both "
        "vs a float64 numpy reference rounded once; ulps alone mislead near zero, so the "
        "largest difference relative to the largest value is given too):",
        "",
    ]
    for row in result["runs"]:
        v = row["verify"]
        lines.append(
            f"- {row['strategy']}, {row['clients']:,} x {row['params']:,}: vs Flower "
            f"{v['summary']}. {v['detail']}."
        )
    lines += [
        "",
        "Where they differ: Flower's trimmed mean keeps the same values (the same "
        "np.partition as scipy's trim_mean) but averages them with np.mean in float32, one "
        "rounding per row added; Micro-FL adds them in float64 and rounds once. Flower's Krum "
        "takes squared distances as |a|^2 + |b|^2 - 2ab in float32 on the raw updates, which "
        "cancels most digits of distances between updates that share most of the model; "
        "Micro-FL centres the rows and works in float64, so when scores are close the two "
        "can pick different clients. Medians are the same bits (the mean of the two middle "
        "float32 values rounds alike in both).",
    ]
    t = result["targets"]
    if not any(r["clients"] == t["clients"] for r in result["runs"]):
        lines += [
            "",
            f"Memory targets are for {t['clients']:,} clients x 1M parameters; this "
            "run did not measure them (quick).",
        ]
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)
