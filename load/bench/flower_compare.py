"""Micro-FL's aggregation side by side with Flower's own FedAvg aggregation, on the same updates
in the same run: time, peak memory, and the model each produces.

For each N a FileStore gets N updates of a 1M-parameter model and the seal of round 1. Then, each
in a fresh process (peak = VmHWM of that process; "work" = peak - RSS after the imports):

- microfl: aggregate.build_node for every node of the sealed round's tree (the leaves, then the
  inner nodes), then finalize.commit, one process doing the work of all instances one after
  another, numba's kernels loaded before (a warm instance). Its time includes reading every
  update from storage, writing the nodes (fsync) and the model. In the platform the leaves are
  folded while the round fills; here all of them come after the seal (the most work left).
- flower-aggregate: flwr.server.strategy.aggregate.aggregate, fed what its API expects: a list of
  (list of ndarrays, num_examples), all N updates in memory at once.
- flower-arrayrecords: flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords (what the
  message-API FedAvg calls): a list of RecordDict with an ArrayRecord and a MetricRecord
  {"num-examples": n}, the arrays as Flower holds them after a message arrives (npy bytes).

Flower's time is given twice: the aggregation call alone (updates already in memory), and with
loading the same safetensors files from disk (safetensors.numpy) into its input first. Then the
three models are compared with each other and with an exact float64 FedAvg.

flwr is not a runtime dependency: `pip install -e '.[bench]'`, or a folder of it named by
MICROFL_BENCH_DEPS (appended to sys.path, as in round_latency)."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import report
from round_latency import _extra_path

__all__ = ["NAME", "flower_inputs", "markdown", "run", "targets"]

NAME = "flower_compare"
CLIENTS = (100, 1000)
QUICK_CLIENTS = (100,)
PARAMS = 1_000_000
FAN_IN = 10
TARGET_SPEEDUP = 5.0
TARGET_MEMORY = 10.0
TARGET_CLIENTS = 1000
FLOWER_APIS = ("aggregate", "arrayrecords")


def run(quick: bool = False, workdir: Path | None = None) -> dict[str, Any]:
    _extra_path()
    try:
        from importlib.metadata import version

        flwr_version = version("flwr")
    except Exception as exc:
        raise RuntimeError(
            "flower_compare needs flwr: pip install -e '.[bench]' (a bench extra, not a "
            "runtime dependency)"
        ) from exc
    tmp = Path(tempfile.mkdtemp(prefix="microfl-flower-", dir=workdir))
    rows = []
    try:
        for n in QUICK_CLIENTS if quick else CLIENTS:
            root = tmp / f"clients-{n}"
            procstat.log(NAME, f"N={n}: writing {n} updates of {PARAMS:,} parameters")
            made = _step("generate", root, str(n))
            row: dict[str, Any] = {"clients": n, "generate": made}
            procstat.log(NAME, f"N={n}: microfl (build_node x {made['nodes']} + commit)")
            row["microfl"] = _step("microfl", root)
            _say(n, "microfl", row["microfl"])
            for api in FLOWER_APIS:
                procstat.log(NAME, f"N={n}: flower {api}")
                row[f"flower_{api}"] = _step("flower", root, api)
                _say(n, f"flower {api}", row[f"flower_{api}"])
            row["verify"] = _step("verify", root)
            procstat.log(NAME, f"N={n}: models agree: {row['verify']}")
            rows.append(row)
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for row in rows:
        me = row["microfl"]
        row["ratios"] = {
            api: {
                "time_compute_only": row[f"flower_{api}"]["aggregate_seconds"] / me["seconds"],
                "time_with_load": row[f"flower_{api}"]["seconds"] / me["seconds"],
                "peak": row[f"flower_{api}"]["peak_mib"] / me["peak_mib"],
                "work": row[f"flower_{api}"]["work_mib"] / me["work_mib"],
            }
            for api in FLOWER_APIS
        }
    at = [r for r in rows if r["clients"] == TARGET_CLIENTS]
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "clients": [r["clients"] for r in rows],
            "params": PARAMS,
            "fan_in": FAN_IN,
            "flwr": flwr_version,
            "tolerance": rows[0]["verify"]["tolerance"],  # microfl.local.reference's
        },
        "runs": rows,
        "targets": {"speedup": TARGET_SPEEDUP, "memory": TARGET_MEMORY, "clients": TARGET_CLIENTS},
        "within_target": bool(at)
        and all(
            r["ratios"][api]["time_compute_only"] >= TARGET_SPEEDUP
            and r["ratios"][api]["work"] >= TARGET_MEMORY
            for r in at
            for api in FLOWER_APIS
        )
        and all(r["verify"]["agree"] for r in rows),
    }


def _step(step: str, root: Path, *args: str) -> dict[str, Any]:
    return procstat.run_step(Path(__file__), step, str(root), *args)


def _say(n: int, what: str, got: dict[str, Any]) -> None:
    extra = (
        f", aggregation call {got['aggregate_seconds']:.2f} s" if "aggregate_seconds" in got else ""
    )
    procstat.log(
        NAME,
        f"N={n}:   {what}: {got['seconds']:.2f} s{extra}, peak {got['peak_mib']:.0f} MiB "
        f"(work {got['work_mib']:.0f} MiB)",
    )


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    t = result["targets"]
    out = []
    for row in result["runs"]:
        if row["clients"] != t["clients"]:
            continue
        for api in FLOWER_APIS:
            ratio = row["ratios"][api]
            out.append(
                {
                    "target": f">= {t['speedup']:g}x faster than Flower {api}, "
                    f"{row['clients']:,} clients x 1M",
                    "measured": f"{ratio['time_compute_only']:.2f}x (Flower in memory); "
                    f"{ratio['time_with_load']:.2f}x counting its load from disk",
                    "met": ratio["time_compute_only"] >= t["speedup"],
                }
            )
            out.append(
                {
                    "target": f">= {t['memory']:g}x less peak memory than Flower {api}, "
                    f"{row['clients']:,} clients x 1M",
                    "measured": f"{ratio['work']:.0f}x less working memory, "
                    f"{ratio['peak']:.0f}x less peak RSS",
                    "met": ratio["work"] >= t["memory"],
                }
            )
    agree = [r["verify"]["agree"] for r in result["runs"]]
    worst = max(e for r in result["runs"] for e in r["verify"]["pairwise"].values())
    out.append(
        {
            "target": f"same model as Flower within {result['config']['tolerance']:g}",
            "measured": f"max difference {worst:.1e} of the largest weight",
            "met": all(agree),
        }
    )
    return out


def markdown(result: dict[str, Any], machine: dict[str, Any]) -> str:
    cfg = result["config"]
    lines = [
        "## Micro-FL vs Flower aggregation",
        "",
        f"Same updates, same run: {cfg['params']:,} float32 parameters "
        f"({cfg['params'] * 4 / 2**20:.2f} MiB) per update, flwr {cfg['flwr']}. Each column "
        "is a fresh process; peak is its VmHWM, work is peak minus its RSS after imports. "
        "**Micro-FL** = aggregate.build_node for every node of the round's tree (fan-in "
        f"{cfg['fan_in']}; leaves, then inner nodes) + finalize.commit, sequentially in one "
        "process with numba's kernels loaded first (a warm instance), *including* reading "
        "every update from the FileStore (page cache) and writing nodes and model with "
        "fsync; every leaf after the seal (in the platform they are folded while the round "
        "fills). **Flower aggregate** = `flwr.server.strategy.aggregate.aggregate` on a list of "
        "(ndarrays, num_examples); **Flower arrayrecords** = "
        "`flwr.serverapp.strategy.strategy_utils.aggregate_arrayrecords` (the message-API "
        "FedAvg's helper) on RecordDicts; both hold all N updates in memory, as their APIs "
        "require. Flower's time is the aggregation call alone, and in brackets with loading "
        "the same safetensors files from disk first.",
        "",
        "| clients | what | time s | peak MiB | work MiB | Flower time / Micro-FL "
        "(with load) | Flower work / Micro-FL work | max rel. diff vs exact |",
        "| ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result["runs"]:
        me = row["microfl"]
        err = row["verify"]["errors"]
        lines.append(
            f"| {row['clients']} | Micro-FL | {me['seconds']:.2f} | {me['peak_mib']:.0f} "
            f"| {me['work_mib']:.0f} | 1 | 1 | {err['microfl']:.1e} |"
        )
        for api in FLOWER_APIS:
            fl, ratio = row[f"flower_{api}"], row["ratios"][api]
            lines.append(
                f"| {row['clients']} | Flower {api} | {fl['aggregate_seconds']:.2f} "
                f"({fl['seconds']:.2f}) | {fl['peak_mib']:.0f} | {fl['work_mib']:.0f} "
                f"| {ratio['time_compute_only']:.2f}x ({ratio['time_with_load']:.2f}x) "
                f"| {ratio['work']:.0f}x | {err[f'flower_{api}']:.1e} |"
            )
    lines += ["", f"Agreement (max |a - b| / max |exact|, tolerance {cfg['tolerance']:g}):", ""]
    for row in result["runs"]:
        v = row["verify"]
        pairs = ", ".join(f"{k} {e:.1e}" for k, e in v["pairwise"].items())
        lines.append(f"- {row['clients']} clients: {pairs} ({'agree' if v['agree'] else 'DIFFER'})")
    lines += [
        "",
        "Micro-FL sums exactly (integers on a fixed grid, microfl.exactsum) and rounds once, "
        "so its model stays within about one float32 rounding of the exact FedAvg whatever N. "
        "Both Flower helpers sum in float32 (float32 "
        "arrays times a Python number stay float32 in NumPy 2), so their error grows with N; "
        "where the pair differs by more than the tolerance, the column *max rel. diff vs "
        "exact* shows which side is off.",
    ]
    t = result["targets"]
    at = [r for r in result["runs"] if r["clients"] == t["clients"]]
    lines += [
        "",
        f"Targets at {t['clients']} clients: >= {t['speedup']:g}x faster and >= "
        f"{t['memory']:g}x less peak memory than Flower's aggregation.",
    ]
    if not at:
        lines.append(f"- not measured in this run (quick mode stops at {cfg['clients'][-1]}).")
    for row in at:
        for api in FLOWER_APIS:
            ratio = row["ratios"][api]
            speed = ratio["time_compute_only"]
            lines.append(
                f"- vs Flower {api}: speed {speed:.2f}x "
                + ("(met)" if speed >= t["speedup"] else f"(MISSED by {t['speedup'] / speed:.1f}x)")
                + f", {ratio['time_with_load']:.2f}x counting Flower's load; memory "
                f"{ratio['work']:.0f}x less work memory, {ratio['peak']:.0f}x less peak RSS "
                + ("(met)" if ratio["work"] >= t["memory"] else "(MISSED)")
                + "."
            )
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


# --- child steps -------------------------------------------------------------------------------


def generate(root: Path, clients: int) -> dict[str, Any]:
    import synth

    from microfl.jobs import load_job
    from microfl.rounds import Rounds

    store, updates, seconds = synth.write_round(root, PARAMS, clients, FAN_IN)
    sealed = Rounds(store, load_job(store, synth.JOB)).seal(synth.ROUND)
    assert sealed is not None
    return {
        "seconds": seconds,
        "nodes": sum(sealed.tree.sizes),
        "model_bytes": updates.model_bytes,
        "params": PARAMS,
    }


def microfl(root: Path) -> dict[str, Any]:
    import synth

    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.finalize import commit
    from microfl.jobs import load_job
    from microfl.store import FileStore

    b = Backends(FileStore(root), MemoryBus())
    spec = load_job(b.store, synth.JOB)
    warm = synth.warm_kernels()

    def work() -> dict[str, Any]:
        start = time.perf_counter()
        nodes = synth.build_tree(b, spec, synth.ROUND)
        aggregate_s = time.perf_counter() - start
        if not commit(b, spec, synth.ROUND):
            raise RuntimeError("finalize.commit did not commit round 1")
        return {
            "nodes": nodes,
            "warm_up_seconds": warm,
            "aggregate_phase_seconds": aggregate_s,
            "finalize_phase_seconds": time.perf_counter() - start - aggregate_s,
        }

    return procstat.measured(work)


def flower(root: Path, api: str) -> dict[str, Any]:
    _extra_path()
    import numpy as np
    import synth

    from microfl.jobs import load_job
    from microfl.rounds import Rounds, update_key
    from microfl.store import FileStore

    if api == "aggregate":
        from flwr.server.strategy.aggregate import aggregate
    else:
        from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    store = FileStore(root)
    sealed = Rounds(store, load_job(store, synth.JOB)).seal(synth.ROUND)
    assert sealed is not None
    clients = sealed.clients
    paths = [store.root / update_key(synth.JOB, synth.ROUND, c) for c in clients]
    names: list[str] = []
    timing: dict[str, float] = {}

    def work() -> dict[str, Any]:
        start = time.perf_counter()
        names[:], items = flower_inputs(paths, api)
        timing["load"] = time.perf_counter() - start
        loaded_mib = procstat.status_mib("VmRSS")
        start = time.perf_counter()
        if api == "aggregate":
            result = dict(zip(names, aggregate(items), strict=True))
        else:
            record = aggregate_arrayrecords(items, "num-examples")
            result = {k: record[k].numpy() for k in names}
        timing["aggregate"] = time.perf_counter() - start
        timing["loaded_mib"] = loaded_mib or 0.0
        timing["result"] = result  # type: ignore[assignment]
        return {}

    got = procstat.measured(work)
    np.savez(root / f"flower-{api}.npz", **timing.pop("result"))  # type: ignore[arg-type]
    return {
        **got,
        "load_seconds": timing["load"],
        "aggregate_seconds": timing["aggregate"],
        "rss_after_load_mib": timing["loaded_mib"],
        "dtype": str(np.load(root / f"flower-{api}.npz")[names[0]].dtype),
    }


def flower_inputs(paths: list[Path], api: str) -> tuple[list[str], list[Any]]:
    """The updates in these safetensors files as Flower's API takes them, all in memory: for
    "aggregate" (the legacy strategy functions) a list of (ndarrays, num_examples), for
    "arrayrecords" (the message API) a list of RecordDict with an ArrayRecord under "arrays" and
    a MetricRecord {"num-examples": n} under "metrics". Also the tensor names, sorted."""
    from safetensors import safe_open

    if api != "aggregate":
        from flwr.app import Array, ArrayRecord, MetricRecord, RecordDict
    names: list[str] = []
    items: list[Any] = []
    for path in paths:
        with safe_open(str(path), framework="np") as f:
            n = int(f.metadata()["num_examples"])
            names = sorted(f.keys())
            arrays = [f.get_tensor(name) for name in names]
        if api == "aggregate":
            items.append((arrays, n))
        else:
            record = ArrayRecord({k: Array(a) for k, a in zip(names, arrays, strict=True)})
            items.append(
                RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": n})})
            )
    return names, items


def verify(root: Path) -> dict[str, Any]:
    import numpy as np
    import synth

    from microfl.jobs import load_job, model_key
    from microfl.local.reference import TOLERANCE, fedavg_error
    from microfl.rounds import Rounds
    from microfl.serde import tensors_from_safetensors
    from microfl.store import FileStore

    store = FileStore(root)
    sealed = Rounds(store, load_job(store, synth.JOB)).seal(synth.ROUND)
    data = store.read(model_key(synth.JOB, synth.ROUND))
    assert sealed is not None and data is not None
    n = len(sealed.clients)
    exact = synth.Updates(synth.model(PARAMS, 0), n, 1).fedavg()
    models = {"microfl": tensors_from_safetensors(data)[0]}
    for api in FLOWER_APIS:
        with np.load(root / f"flower-{api}.npz") as f:
            models[f"flower_{api}"] = {k: f[k] for k in f.files}
    errors = {name: fedavg_error(m, exact) for name, m in models.items()}
    names = list(models)
    pairwise = {
        f"{a} vs {b}": fedavg_error(models[a], models[b])
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    }
    return {
        "errors": errors,
        "pairwise": pairwise,
        "agree": all(e <= TOLERANCE for e in pairwise.values()),
        "tolerance": TOLERANCE,
        "max_abs_exact": max(float(np.max(np.abs(a))) for a in exact.values()),
    }


if __name__ == "__main__":
    procstat.step_main(generate, microfl, flower, verify)
