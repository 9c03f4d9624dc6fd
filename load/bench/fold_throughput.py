"""Fold throughput: GB/s of update data that the aggregate path folds into its float64 sum,
against a plain numpy memory copy of the same bytes in the same process (the practical ceiling).

For each model size a fresh process writes K distinct updates (about DISTINCT_MB of them, more
than the caches hold) to a FileStore, reads them once so they sit in the page cache, then times
passes over all K (best of REPEATS):

- memcpy: np.copyto of every update's tensors into one buffer (updates already in memory);
- read: FileStore.read of every update (page cache -> a new bytes object);
- validate: jobs.validate_update (schema and the NaN/Inf scan) on updates in memory;
- fold: the product's fold (PRODUCT_FOLD below) on updates in memory;
- aggregate path: read + parse + validate + fold, leaf by leaf (FAN_IN updates), as the aggregate
  function does (the headline number: "read, validate, accumulate"); with PRODUCT_FOLD =
  "aggregate" it is aggregate.fold_updates itself on the bytes read (schema checks; the values
  are checked by the exact fold's range test);
- build_node: aggregate.build_node for every leaf of the sealed round, including reading the
  seal, serialising the exact partial and writing it create-only with fsync;
- the other fold implementations that import (FOLDS), through the same path, for comparison.

- the same updates as fp16, bf16 and int8 deltas (microfl.compress): the fold alone and
  aggregate.fold_updates on their bodies in memory, beside float32's (per parameter).

GB/s counts the updates' tensor bytes (float32), 1 GB = 1e9 bytes."""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import procstat
import report

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "fold_throughput"
SIZES = (1_000_000, 10_000_000)
DISTINCT_MB = 320
QUICK_DISTINCT_MB = 64
REPEATS = 5
QUICK_REPEATS = 2
FAN_IN = 10
TARGET = 0.5  # aggregate path GB/s over memcpy GB/s
HEADLINE = "aggregate_path"
COMPRESSED = ("fp16", "bf16", "int8")  # encodings whose fold is measured against float32's
COMPRESSED_TARGET = 1.0  # their fold: at least float32's parameters per second
# >>> The product's partial-sum fold, the one line to adjust when the aggregate function's fold
# changes: "strategy" (microfl.strategy.fold into a float64 sum, the aggregate before issue 15),
# "exactsum" (microfl.exactsum.ExactSum.fold, one update per call), "exactsum_many"
# (ExactSum.fold_many, one leaf of FAN_IN updates per call) or "aggregate" (what
# aggregate.fold_updates does: ExactSum.fold_many, aggregate.GROUP updates per call).
PRODUCT_FOLD = "aggregate"
FOLDS = ("strategy", "exactsum", "exactsum_many", "aggregate")  # each measured if it imports
ROWS = (
    ("memcpy", "numpy memory copy (ceiling)"),
    ("read", "FileStore.read only"),
    ("validate", "validate_update only (in memory)"),
    ("fold", "the product's fold only (in memory)"),
    ("aggregate_path", "**aggregate path: read + validate + fold**"),
    ("compute_partial", "compute_partial (+ partial serialised, written, fsync)"),
    ("build_node", "build_node, every leaf (+ seal read, node serialised, written, fsync)"),
    ("fold_fp16", "fold only, the updates as fp16 (in memory)"),
    ("fold_bf16", "fold only, the updates as bf16 (in memory)"),
    ("fold_int8", "fold only, the updates as int8 deltas (in memory)"),
    ("bytes_f32", "fold_updates on float32 bodies in memory (parse, validate, fold)"),
    ("bytes_fp16", "fold_updates on fp16 bodies in memory"),
    ("bytes_bf16", "fold_updates on bf16 bodies in memory"),
    ("bytes_int8", "fold_updates on int8 bodies in memory (+ decode with the base)"),
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
                f"({row['product_fold']}) {row['gbps'][HEADLINE]:.2f} GB/s ({ratio:.0%})",
            )
            rows.append(row)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        row["ratio"] = row["gbps"][HEADLINE] / row["gbps"]["memcpy"]
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "sizes": list(SIZES),
            "distinct_mb": distinct,
            "repeats": repeats,
            "fan_in": FAN_IN,
            "store": "FileStore (page cache warm)",
            "product_fold": PRODUCT_FOLD,
        },
        "runs": rows,
        "target_ratio": TARGET,
        "within_target": all(r["ratio"] >= TARGET for r in rows),
    }


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    import baseline

    before = {r["params"]: r for r in (baseline.load(NAME, result) or {}).get("runs", [])}
    out = []
    for r in result["runs"]:
        was = before.get(r["params"])
        out.append(
            {
                "target": f"fold path >= {TARGET:.0%} of memcpy, {r['params'] / 1e6:g}M params",
                "measured": f"{r['ratio']:.0%} ({r['gbps'][HEADLINE]:.2f} vs "
                f"{r['gbps']['memcpy']:.2f} GB/s, fold: {_fold_of(r)})"
                + (f"; before: {was['ratio']:.0%} ({_fold_of(was)})" if was else ""),
                "met": r["ratio"] >= TARGET,
            }
        )
        for how, ratio in _compressed_ratios(r).items():
            out.append(
                {
                    "target": f"{how} fold >= float32's params/s, {r['params'] / 1e6:g}M params",
                    "measured": f"{ratio['fold']:.2f}x float32's fold; from bytes "
                    f"{ratio['bytes']:.2f}x",
                    "met": ratio["fold"] >= COMPRESSED_TARGET,
                }
            )
    return out


def _compressed_ratios(row: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per encoding: its fold's and its fold_updates' parameters/s over float32's."""
    g = row["gbps"]
    return {
        how: {"fold": g[f"fold_{how}"] / g["fold"], "bytes": g[f"bytes_{how}"] / g["bytes_f32"]}
        for how in COMPRESSED
        if f"fold_{how}" in g and "bytes_f32" in g
    }


def _fold_of(row: dict[str, Any]) -> str:
    return str(row.get("product_fold", "strategy"))


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    import baseline

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
        "FileStore.read, parse, validate, the product's fold "
        f"(`{_fold_of(runs[0]) if runs else '?'}`; PRODUCT_FOLD in fold_throughput.py; "
        "`aggregate` is aggregate.fold_updates itself: schema checks, values range-checked by "
        "the exact fold, numba's kernels loaded before timing; `strategy` ran validate_update's "
        "NaN/Inf scan and a float64 fold). "
        "*path with* rows run the same path with the other fold implementations that import.",
        "",
        f"| step | {head} |",
        "| --- |" + " ---: |" * len(runs),
    ]
    keys = [k for k, _ in ROWS] + sorted(
        {k for r in runs for k in r["gbps"] if k.startswith("path_")}
    )
    labels = dict(ROWS)
    for key in keys:
        if not any(key in r["gbps"] for r in runs):
            continue
        label = labels.get(key) or f"path with {key[len('path_') :]}"
        cells = " | ".join(_cell(r["gbps"].get(key)) for r in runs)
        lines.append(f"| {label} | {cells} |")
    lines.append(
        "| aggregate path / memcpy | " + " | ".join(f"**{r['ratio']:.0%}**" for r in runs) + " |"
    )
    lines.append(
        "| updates (distinct) x MB | "
        + " | ".join(f"{r['updates']} x {r['model_bytes'] / 1e6:.1f}" for r in runs)
        + " |"
    )
    old = baseline.load(NAME, {"machine": machine}) or {}
    before = {r["params"]: r for r in old.get("runs", [])}
    lines += ["", f"Target: aggregate path >= {TARGET:.0%} of the memory-copy rate."]
    for r in runs:
        verdict = "met" if r["ratio"] >= TARGET else f"MISSED by {TARGET / r['ratio']:.1f}x"
        was = before.get(r["params"])
        lines.append(
            f"- {r['params']:,} parameters: {r['ratio']:.0%} ({verdict})"
            + (f"; before: {was['ratio']:.0%} with {_fold_of(was)}" if was else "")
            + "."
        )
    lines += [
        "",
        "Compressed updates (the fp16/bf16/int8 rows above; rates in float32-equivalent GB/s, so "
        f"ratios are parameters per second). Target: each fold >= {COMPRESSED_TARGET:g}x "
        "float32's.",
    ]
    for r in runs:
        sizes = r.get("update_bytes", {})
        for how, ratio in _compressed_ratios(r).items():
            lines.append(
                f"- {r['params']:,} parameters, {how}: fold {ratio['fold']:.2f}x float32's, "
                f"fold_updates on bodies {ratio['bytes']:.2f}x"
                + (f"; body {sizes['f32'] / sizes[how]:.2f}x smaller" if how in sizes else "")
                + "."
            )
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# --- the child process -------------------------------------------------------------------------


def _folds(
    base: dict[str, Any], max_weight: int
) -> dict[str, Callable[[Iterable[tuple[Any, int]]], Any]]:
    """Every fold of FOLDS that imports: a function that sums one chunk's (tensors, weight)
    pairs, taking them one at a time from the iterator (or a chunk at a time, for fold_many)."""
    from microfl.strategy import fold

    def strategy(items: Iterable[tuple[Any, int]]) -> Any:
        acc = None
        for tensors, n in items:
            acc = fold(acc, tensors, float(n))
        return acc

    out: dict[str, Callable[[Iterable[tuple[Any, int]]], Any]] = {"strategy": strategy}
    try:
        from microfl.exactsum import ExactSum
    except ImportError:
        return out

    def exact(items: Iterable[tuple[Any, int]]) -> Any:
        acc = ExactSum(base)
        for tensors, n in items:
            acc.fold(tensors, int(n))
        return acc

    def exact_many(items: Iterable[tuple[Any, int]]) -> Any:
        pairs = list(items)
        acc = ExactSum(base)
        acc.fold_many([t for t, _ in pairs], [int(n) for _, n in pairs])
        return acc

    out.update(exactsum=exact, exactsum_many=exact_many)
    try:
        from microfl.aggregate import GROUP
    except ImportError:
        return out

    def product(items: Iterable[tuple[Any, int]]) -> Any:
        pairs = list(items)
        acc = ExactSum(base, max_weight=max_weight)
        for i in range(0, len(pairs), GROUP):
            group = pairs[i : i + GROUP]
            acc.fold_many([t for t, _ in group], [int(n) for _, n in group])
        return acc

    out["aggregate"] = product
    return out


def child(root: Path, params: int, distinct_mb: int, repeats: int) -> dict[str, Any]:
    import numpy as np
    import synth

    from microfl import aggregate
    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.exactsum import ExactSum
    from microfl.jobs import load_job, model_key, validate_update
    from microfl.rounds import Rounds, nodes_prefix, update_key
    from microfl.serde import tensors_from_safetensors

    model_bytes = params * 4
    k = max(FAN_IN, round(distinct_mb * 1e6 / model_bytes / FAN_IN) * FAN_IN)
    if k * model_bytes > 2 * distinct_mb * 1e6:  # 10M parameters: fewer, not a whole chunk
        k = max(2, int(distinct_mb * 1e6 // model_bytes))
    fan_in = min(FAN_IN, k)
    store, updates, wrote = synth.write_round(root, params, k, fan_in)
    b = Backends(store, MemoryBus())
    spec = load_job(store, synth.JOB)
    base, _ = tensors_from_safetensors(store.read(model_key(synth.JOB, 0)) or b"")
    folds = _folds(base, spec.max_examples)
    synth.warm_kernels()
    if PRODUCT_FOLD not in folds:
        raise RuntimeError(f"PRODUCT_FOLD = {PRODUCT_FOLD!r} does not import here")
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
            folds[PRODUCT_FOLD](
                (tensors, int(meta["num_examples"])) for tensors, meta in loaded[i : i + fan_in]
            )

    def read_validate(chunk: list[str]) -> Iterator[tuple[Any, int]]:
        for key in chunk:
            tensors, meta = tensors_from_safetensors(store.read(key) or b"")
            yield tensors, validate_update(spec, tensors, meta)

    def path(name: str) -> Callable[[], None]:
        def run_path() -> None:
            for chunk in chunks:
                folds[name](read_validate(chunk))

        def run_product() -> None:  # a leaf's work in aggregate.build_node, minus the write
            for chunk in chunks:
                acc = ExactSum(base, max_weight=spec.max_examples)
                aggregate.fold_updates(acc, spec, [(key, store.read(key)) for key in chunk])

        return run_product if name == "aggregate" else run_path

    def clear_nodes() -> None:
        for key in store.list(nodes_prefix(synth.JOB, synth.ROUND)):
            store.delete(key)

    leaves = Rounds(store, spec).seal(synth.ROUND).tree.sizes[0]  # type: ignore[union-attr]

    def build_leaves() -> None:  # the aggregate function, leaf by leaf
        for j in range(leaves):
            aggregate.build_node(b, spec, synth.ROUND, 0, j)

    # Compressed updates (microfl.compress): the same updates as fp16, bf16 and int8 deltas
    # from the base, folded from memory (decoded: F16/BF16 arrays, int8 codes with their
    # scales and base) and through aggregate.fold_updates on their bytes in memory (parse,
    # validate, decode, fold), beside float32 the same way. Rates count the float32 bytes of
    # the same parameters, so a ratio of two rows is a ratio of parameters per second.
    from microfl.compress import decode, encode
    from microfl.serde import tensors_to_safetensors

    bodies: dict[str, list[bytes]] = {"f32": []}
    for tensors, meta in loaded:
        bodies["f32"].append(tensors_to_safetensors(tensors, meta))
        for how in COMPRESSED:
            bodies.setdefault(how, []).append(
                tensors_to_safetensors(encode(tensors, how, base), meta)
            )
    decoded = {
        how: [
            (decode(t, base), int(m["num_examples"]))
            for t, m in map(tensors_from_safetensors, bodies[how])
        ]
        for how in COMPRESSED
    }

    def fold_encoded(how: str) -> Callable[[], None]:
        def run_fold() -> None:
            for i in range(0, k, fan_in):
                folds[PRODUCT_FOLD](iter(decoded[how][i : i + fan_in]))

        return run_fold

    def parse_fold(how: str) -> Callable[[], None]:
        def run_parse_fold() -> None:
            for i in range(0, k, fan_in):
                acc = ExactSum(base, max_weight=spec.max_examples)
                members = [(str(j), bodies[how][j]) for j in range(i, min(i + fan_in, k))]
                meta = aggregate.fold_updates(acc, spec, members, base)
                assert not meta.excluded, meta.excluded

        return run_parse_fold

    steps: dict[str, tuple[Callable[[], None], Callable[[], None] | None]] = {
        "memcpy": (memcpy, None),
        "read": (read, None),
        "validate": (validate, None),
        "fold": (fold_only, None),
        "aggregate_path": (path(PRODUCT_FOLD), None),
    }
    try:
        build_leaves()
        clear_nodes()
        steps["build_node"] = (build_leaves, clear_nodes)
    except Exception as exc:  # noqa: BLE001  # any failure: the row is left out, and said why
        procstat.log(NAME, f"  build_node left out: {type(exc).__name__}: {exc}")
    for name in folds:
        if name != PRODUCT_FOLD:
            steps[f"path_{name}"] = (path(name), None)
    for how in COMPRESSED:
        steps[f"fold_{how}"] = (fold_encoded(how), None)
    for how in ("f32", *COMPRESSED):
        steps[f"bytes_{how}"] = (parse_fold(how), None)
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
        "product_fold": PRODUCT_FOLD,
        "write_seconds": wrote,
        "seconds": times,
        "gbps": {name: total / min(ts) / 1e9 for name, ts in times.items()},
        "gbps_median": {name: total / sorted(ts)[len(ts) // 2] / 1e9 for name, ts in times.items()},
        "vm_hwm_mib": procstat.status_mib("VmHWM"),
        "update_bytes": {how: len(bodies[how][0]) for how in bodies},
    }


if __name__ == "__main__":
    procstat.step_main(child)
