"""Fold throughput: GB/s of update data that the aggregate path folds into its float64 sum,
against a plain numpy memory copy of the same bytes in the same process (the practical ceiling).

For each model size a fresh process writes K distinct updates (about DISTINCT_MB of them, more
than the caches hold) to a FileStore, reads them once so they sit in the page cache, then times
passes over all K (best of REPEATS):

- memcpy: np.copyto of every update's tensors into one buffer (updates already in memory);
- read: FileStore.read of every update (page cache -> a new bytes object);
- validate: jobs.validate_update (schema and the NaN/Inf scan) on updates in memory;
- fold: strategy.fold on updates in memory;
- aggregate path: read + parse + validate + fold, chunk by chunk, as aggregate._partial_bytes
  does (the headline number: "read, validate, accumulate");
- compute_partial: the whole function for every chunk, including serialising the float64
  partial and writing it create-only with fsync;
- and the same path and function with the changes in patched.py, whose partials must be
  byte-identical to the real ones.

GB/s counts the updates' tensor bytes (float32), 1 GB = 1e9 bytes."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import report

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "fold_throughput"
SIZES = (100_000, 1_000_000, 10_000_000)
DISTINCT_MB = 320
QUICK_DISTINCT_MB = 64
REPEATS = 5
QUICK_REPEATS = 2
FAN_IN = 10
TARGET = 0.5  # aggregate path GB/s over memcpy GB/s
HEADLINE = "aggregate_path"
ROWS = (
    ("memcpy", "numpy memory copy (ceiling)"),
    ("read", "FileStore.read only"),
    ("validate", "validate_update only (in memory)"),
    ("fold", "strategy.fold only (in memory)"),
    ("aggregate_path", "**aggregate path: read + validate + fold**"),
    ("compute_partial", "compute_partial (+ partial serialised, written, fsync)"),
    ("patched_fold", "patched: aggregate path with fold_blocked"),
    ("patched_path", "patched: aggregate path, all changes"),
    ("patched_compute_partial", "patched: compute_partial, all changes"),
)


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="microfl-fold-", dir=workdir))
    distinct = QUICK_DISTINCT_MB if quick else DISTINCT_MB
    repeats = QUICK_REPEATS if quick else REPEATS
    rows = []
    try:
        for params in SIZES:
            root = tmp / f"params-{params}"
            procstat.log(NAME, f"{params:,} parameters: {distinct} MB of distinct updates")
            row = procstat.run_step(
                Path(__file__), "child", str(root), str(params), str(distinct), str(repeats)
            )
            shutil.rmtree(root, ignore_errors=True)
            ratio = row["gbps"][HEADLINE] / row["gbps"]["memcpy"]
            procstat.log(
                NAME,
                f"  memcpy {row['gbps']['memcpy']:.2f} GB/s, aggregate path "
                f"{row['gbps'][HEADLINE]:.2f} GB/s ({ratio:.0%}), patched path "
                f"{row['gbps']['patched_path']:.2f} GB/s",
            )
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row["ratio"] = row["gbps"][HEADLINE] / row["gbps"]["memcpy"]
        row["patched_ratio"] = row["gbps"]["patched_path"] / row["gbps"]["memcpy"]
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "sizes": list(SIZES),
            "distinct_mb": distinct,
            "repeats": repeats,
            "fan_in": FAN_IN,
            "store": "FileStore (page cache warm)",
        },
        "runs": rows,
        "target_ratio": TARGET,
        "within_target": all(r["ratio"] >= TARGET for r in rows),
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "target": f"fold throughput >= {TARGET:.0%} of memcpy, {r['params'] / 1e6:g}M params",
            "measured": f"{r['ratio']:.0%} ({r['gbps'][HEADLINE]:.2f} vs "
            f"{r['gbps']['memcpy']:.2f} GB/s); patched {r['patched_ratio']:.0%}",
            "met": r["ratio"] >= TARGET,
        }
        for r in result["runs"]
    ]


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    runs = result["runs"]
    cfg = result["config"]
    head = " | ".join(f"{r['params'] / 1e6:g}M params" for r in runs)
    lines = [
        "## Fold throughput",
        "",
        "GB/s of float32 update bytes (1 GB = 1e9 B) through each step, one fresh process per "
        f"model size; about {cfg['distinct_mb']} MB of distinct updates per size (more than the "
        f"caches hold), fan-in {cfg['fan_in']}, files in the page cache, best of "
        f"{cfg['repeats']} passes. The aggregate path is what aggregate does per update: "
        "FileStore.read, parse, validate_update (schema and NaN/Inf scan), strategy.fold into "
        "the float64 sum. *patched* rows time the changes in `load/bench/patched.py` (same "
        "bytes out, checked).",
        "",
        f"| step | {head} |",
        "| --- |" + " ---: |" * len(runs),
    ]
    for key, label in ROWS:
        cells = " | ".join(f"{r['gbps'][key]:.2f}" for r in runs)
        lines.append(f"| {label} | {cells} |")
    lines.append(
        "| aggregate path / memcpy | " + " | ".join(f"**{r['ratio']:.0%}**" for r in runs) + " |"
    )
    lines.append(
        "| patched path / memcpy | " + " | ".join(f"{r['patched_ratio']:.0%}" for r in runs) + " |"
    )
    lines.append(
        "| updates (distinct) x MB | "
        + " | ".join(f"{r['updates']} x {r['model_bytes'] / 1e6:.1f}" for r in runs)
        + " |"
    )
    lines += ["", f"Target: aggregate path >= {TARGET:.0%} of the memory-copy rate."]
    for r in runs:
        verdict = "met" if r["ratio"] >= TARGET else f"MISSED by {TARGET / r['ratio']:.1f}x"
        lines.append(
            f"- {r['params']:,} parameters: {r['ratio']:.0%} ({verdict}); with the patched "
            f"path {r['patched_ratio']:.0%}"
            + (" (would meet it)" if r["patched_ratio"] >= TARGET else "")
            + "."
        )
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


# --- the child process -------------------------------------------------------------------------


def child(root: Path, params: int, distinct_mb: int, repeats: int) -> dict[str, Any]:
    import numpy as np
    import patched
    import synth

    from microfl.aggregate import compute_partial
    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.jobs import load_job, partial_key, partials_prefix, update_key, validate_update
    from microfl.serde import tensors_from_safetensors
    from microfl.strategy import fold

    model_bytes = params * 4
    k = max(FAN_IN, round(distinct_mb * 1e6 / model_bytes / FAN_IN) * FAN_IN)
    if k * model_bytes > 2 * distinct_mb * 1e6:  # 10M parameters: fewer, not a whole chunk
        k = max(2, int(distinct_mb * 1e6 // model_bytes))
    fan_in = min(FAN_IN, k)
    store, updates, wrote = synth.write_round(root, params, k, fan_in)
    b = Backends(store, MemoryBus())
    spec = load_job(store, synth.JOB)
    keys = [update_key(synth.JOB, synth.ROUND, updates.client(i)) for i in range(k)]
    chunks = [keys[i : i + fan_in] for i in range(0, k, fan_in)]
    total = k * model_bytes

    loaded = []
    for key in keys:  # warms the page cache too
        data = store.read(key)
        assert data is not None
        loaded.append(tensors_from_safetensors(data))
    dst = {name: np.empty_like(arr) for name, arr in loaded[0][0].items()}

    def memcpy() -> None:
        for tensors, _ in loaded:
            for name, arr in tensors.items():
                np.copyto(dst[name], arr)

    def read() -> None:
        for key in keys:
            store.read(key)

    def validate() -> None:
        for tensors, meta in loaded:
            validate_update(spec, tensors, meta)

    def fold_only() -> None:
        for i in range(0, k, fan_in):
            acc = None
            for tensors, meta in loaded[i : i + fan_in]:
                acc = fold(acc, tensors, float(meta["num_examples"]))

    def path(read_fn, check, fold_fn, per_chunk_check) -> None:  # type: ignore[no-untyped-def]
        for chunk in chunks:
            acc = None
            for key in chunk:
                tensors, meta = tensors_from_safetensors(read_fn(key))
                acc = fold_fn(acc, tensors, float(check(spec, tensors, meta)))
            if per_chunk_check:
                assert all(bool(np.isfinite(a).all()) for a in acc.values())

    def aggregate_path() -> None:
        path(store.read, validate_update, fold, False)

    def patched_fold() -> None:
        path(store.read, validate_update, patched.fold_blocked, False)

    def patched_path() -> None:
        path(
            lambda key: patched.read_view(store, key),
            patched.validate_schema,
            patched.fold_blocked,
            True,
        )

    def clear_partials() -> None:
        for key in store.list(partials_prefix(synth.JOB, synth.ROUND)):
            store.delete(key)

    def whole(fn) -> None:  # type: ignore[no-untyped-def]
        for c in range(len(chunks)):
            fn(b, synth.JOB, synth.ROUND, c)

    # The patched partials must be byte-identical to the real ones.
    whole(compute_partial)
    real = [store.read(partial_key(synth.JOB, synth.ROUND, c)) for c in range(len(chunks))]
    clear_partials()
    whole(patched.compute_partial)
    mine = [store.read(partial_key(synth.JOB, synth.ROUND, c)) for c in range(len(chunks))]
    clear_partials()
    if real != mine:
        raise RuntimeError("patched.compute_partial wrote different bytes than compute_partial")

    steps = {
        "memcpy": (memcpy, None),
        "read": (read, None),
        "validate": (validate, None),
        "fold": (fold_only, None),
        "aggregate_path": (aggregate_path, None),
        "compute_partial": (lambda: whole(compute_partial), clear_partials),
        "patched_fold": (patched_fold, None),
        "patched_path": (patched_path, None),
        "patched_compute_partial": (lambda: whole(patched.compute_partial), clear_partials),
    }
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):  # interleaved, so a burst of load on the machine hits all alike
        for name, (fn, after) in steps.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
            if after is not None:
                after()
    return {
        "params": params,
        "model_bytes": model_bytes,
        "updates": k,
        "fan_in": fan_in,
        "write_seconds": wrote,
        "seconds": times,
        "gbps": {name: total / min(ts) / 1e9 for name, ts in times.items()},
        "gbps_median": {name: total / sorted(ts)[len(ts) // 2] / 1e9 for name, ts in times.items()},
        "identical_partials": True,
        "vm_hwm_mib": procstat.status_mib("VmHWM"),
    }


if __name__ == "__main__":
    procstat.step_main(child)
