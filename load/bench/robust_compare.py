"""Micro-FL's robust strategies (median, trimmed-mean, krum over coordinate shards) side by side
with Flower's FedMedian, FedTrimmedAvg and Krum on the same updates in the same run: time, peak
memory per instance against the job's memory budget, and whether the models are the same.

One FileStore gets N distinct updates (every client its own draw; one in ten a Byzantine update
with 100x the noise) written straight as safetensors files, hard-linked into one job per
strategy, and each job's round 1 sealed. Then, each in a fresh process (peak = VmHWM; "work" =
peak - RSS after the imports):

- flower: flwr 1.42.0's own code on all N updates in memory, as its API takes them:
  flwr.server.strategy.aggregate.aggregate_median and aggregate_trimmed_avg (what FedMedian and
  FedTrimmedAvg call) on a list of (ndarrays, num_examples); for Krum the message API's
  select_multikrum + aggregate_arrayrecords (what flwr.serverapp.strategy.Krum.aggregate_train
  calls) on RecordDicts. The legacy aggregate_krum computes the N^2 distances in a Python loop
  over 1M-vectors (about half an hour at 1,000 clients), so it is left out.
- microfl-instance: one aggregate instance building one coordinate shard (the first, the
  largest): the peak a deployment sizes its instances by, against JobSpec.memory_budget.
- microfl: every shard one after another in one process, then finalize's commit: time to the
  committed model, and each shard's time (N instances in parallel take about the longest one).
- verify: the committed model against Flower's (cast to float32: exact bytes, or how many ulps
  apart) and, for median and trimmed mean, against a float64 numpy reference.

flwr is not a runtime dependency: pip install -e '.[bench]', or a folder of it named by
MICROFL_BENCH_DEPS (appended to sys.path, as in round_latency)."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import procstat
import report
from round_latency import _extra_path

__all__ = ["NAME", "markdown", "run", "targets"]

NAME = "robust_compare"
SIZES = ((1000, 1_000_000),)
QUICK_SIZES = ((50, 100_000),)
STRATEGIES = ("median", "trimmed-mean", "krum")
FLOWER = {
    "median": "aggregate_median (FedMedian)",
    "trimmed-mean": "aggregate_trimmed_avg (FedTrimmedAvg)",
    "krum": "select_multikrum + aggregate_arrayrecords (Krum)",
}
BETA = 0.1  # Micro-FL's default; Flower's FedTrimmedAvg defaults to 0.2, so both get this
BYZANTINE_EVERY = 10  # client i is Byzantine when i % 10 == 0; krum's f is their number
ATTACK = 100.0  # a Byzantine update's noise, in multiples of an honest one's
NOISE = 0.01
SEED = 20261202
FAN_IN = 10
TARGET_MEMORY = 10.0


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
    tmp = Path(tempfile.mkdtemp(prefix="microfl-robust-", dir=workdir))
    rows = []
    try:
        for n, params in QUICK_SIZES if quick else SIZES:
            root = tmp / f"{n}x{params}"
            procstat.log(NAME, f"{n} x {params:,}: writing {n} updates")
            made = _step("generate", root, str(n), str(params))
            procstat.log(NAME, f"  {made['gib']:.2f} GiB in {made['seconds']:.1f} s")
            for strategy in STRATEGIES:
                rows.append(_one(root, strategy, made))
            shutil.rmtree(root, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {
        "benchmark": NAME,
        "quick": quick,
        "config": {
            "sizes": [list(s) for s in (QUICK_SIZES if quick else SIZES)],
            "flwr": flwr_version,
            "beta": BETA,
            "byzantine_every": BYZANTINE_EVERY,
            "attack": ATTACK,
            "noise": NOISE,
            "seed": SEED,
        },
        "runs": rows,
        "targets": {"memory": TARGET_MEMORY},
        "within_target": all(_met(r) for r in rows),
    }


def _one(root: Path, strategy: str, made: dict[str, Any]) -> dict[str, Any]:
    n, params = made["clients"], made["params"]
    row: dict[str, Any] = {"strategy": strategy, "clients": n, "params": params}
    say = f"{n} x {params:,} {strategy}"
    procstat.log(NAME, f"{say}: Flower {FLOWER[strategy]}")
    row["flower"] = fl = _step("flower", root, strategy)
    procstat.log(
        NAME,
        f"  {fl['call_seconds']:.2f} s (+{fl['load_seconds']:.2f} s loading), peak "
        f"{fl['peak_mib']:.0f} MiB, work {fl['work_mib']:.0f} MiB",
    )
    procstat.log(NAME, f"{say}: Micro-FL, one instance building one shard")
    row["instance"] = one = _step("microfl_instance", root, strategy)
    procstat.log(
        NAME,
        f"  shard {one['shard']}: {one['seconds']:.2f} s, peak {one['peak_mib']:.0f} MiB, "
        f"work {one['work_mib']:.0f} MiB (budget {one['budget_mib']:.0f} MiB)",
    )
    procstat.log(NAME, f"{say}: Micro-FL, every shard in one process, then the commit")
    row["microfl"] = me = _step("microfl", root, strategy)
    procstat.log(
        NAME,
        f"  {me['seconds']:.2f} s ({me['shards']} shards, the longest "
        f"{max(me['shard_seconds']):.2f} s), peak {me['peak_mib']:.0f} MiB",
    )
    row["verify"] = v = _step("verify", root, strategy)
    procstat.log(NAME, f"  vs Flower: {v['summary']}")
    row["ratios"] = {
        "time": fl["call_seconds"] / me["seconds"],
        "time_with_load": fl["seconds"] / me["seconds"],
        "peak": fl["peak_mib"] / one["peak_mib"],
        "work": fl["work_mib"] / one["work_mib"],
    }
    return row


def _met(row: dict[str, Any]) -> bool:
    one = row["instance"]
    return bool(
        one["work_mib"] <= one["budget_mib"]
        and row["ratios"]["peak"] >= TARGET_MEMORY
        and row["verify"]["same_as_flower"]
    )


def _step(step: str, root: Path, *args: str) -> dict[str, Any]:
    return procstat.run_step(Path(__file__), step, str(root), *args)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for row in result["runs"]:
        one, ratio, at = row["instance"], row["ratios"], f"{row['clients']:,} x {row['params']:,}"
        out.append(
            {
                "target": f"{row['strategy']}: one instance within the job's memory budget, {at}",
                "measured": f"{one['work_mib']:.0f} MiB above imports ({one['peak_mib']:.0f} "
                f"MiB peak RSS) of {one['budget_mib']:.0f} MiB",
                "met": one["work_mib"] <= one["budget_mib"],
            }
        )
        out.append(
            {
                "target": f"{row['strategy']}: >= {result['targets']['memory']:g}x less peak "
                f"memory per instance than Flower's process, {at}",
                "measured": f"{ratio['peak']:.0f}x peak RSS, {ratio['work']:.0f}x work",
                "met": ratio["peak"] >= result["targets"]["memory"],
            }
        )
        out.append(
            {
                "target": f"{row['strategy']}: same model as Flower's, {at}",
                "measured": row["verify"]["summary"],
                "met": row["verify"]["same_as_flower"],
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
        f"beta {cfg['beta']:g} on both sides, Krum with f = the number of Byzantine clients, "
        "m = 1. **Flower**: its own functions on all N updates in memory (median, trimmed mean: "
        "flwr.server.strategy.aggregate.aggregate_median / aggregate_trimmed_avg on (ndarrays, "
        "num_examples); Krum: the message API's select_multikrum + aggregate_arrayrecords on "
        "RecordDicts), time of the call alone and in brackets with loading the safetensors "
        "files. **Micro-FL instance**: one aggregate instance building one coordinate shard "
        "(the first), a fresh process; its memory is what a deployment sizes instances by. "
        "**Micro-FL all shards**: every shard one after another in one process plus "
        "finalize's commit (time to the committed model); N instances in parallel take about "
        "the longest shard plus the commit. Peak = VmHWM of the process; work = peak - RSS "
        "after imports.",
        "",
        "| clients x params | strategy | Flower s | Micro-FL all shards s (shards, longest) "
        "| Flower peak / work MiB | Micro-FL instance peak / work MiB | budget MiB "
        "| memory ratio peak (work) | same model as Flower |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in result["runs"]:
        fl, me, one, ratio = row["flower"], row["microfl"], row["instance"], row["ratios"]
        lines.append(
            f"| {row['clients']:,} x {row['params']:,} | {row['strategy']} "
            f"| {fl['call_seconds']:.2f} ({fl['seconds']:.2f}) "
            f"| {me['seconds']:.2f} ({me['shards']}, {max(me['shard_seconds']):.2f}) "
            f"| {fl['peak_mib']:.0f} / {fl['work_mib']:.0f} "
            f"| {one['peak_mib']:.0f} / {one['work_mib']:.0f} | {one['budget_mib']:.0f} "
            f"| {ratio['peak']:.0f}x ({ratio['work']:.0f}x) | {row['verify']['summary']} |"
        )
    lines += ["", "Checks against references:", ""]
    for row in result["runs"]:
        lines.append(f"- {row['strategy']}, {row['clients']:,} clients: {row['verify']['detail']}")
    lines += ["", report.run_line(result, machine)]
    return "\n".join(lines)


# --- child steps -------------------------------------------------------------------------------


def _job(strategy: str) -> str:
    return f"robust-{strategy}"


def generate(root: Path, clients: int, params: int) -> dict[str, Any]:
    """Job robust-STRATEGY for each strategy, N updates hard-linked into each, round 1 sealed."""
    import numpy as np
    import synth

    from microfl.jobs import JobSpec, create_job
    from microfl.rounds import update_key
    from microfl.serde import tensors_to_safetensors
    from microfl.store import FileStore

    store = FileStore(root)
    base = synth.model(params, SEED)
    names = [_client(i) for i in range(clients)]
    specs = {}
    for strategy in STRATEGIES:
        options = {"krum": {"f": _byzantine(clients), "m": 1}, "trimmed-mean": {"beta": BETA}}
        specs[strategy] = JobSpec.for_model(
            _job(strategy),
            base,
            rounds=1,
            min_clients=clients,
            fan_in=FAN_IN,
            strategy=strategy,
            strategy_options=options.get(strategy, {}),
            created_at=time.time(),
        )
        create_job(store, specs[strategy], tensors_to_safetensors(base))
    start = time.perf_counter()

    def path(strategy: str, client: str) -> Path:
        return store.root / update_key(_job(strategy), synth.ROUND, client)

    path(STRATEGIES[0], "x").parent.mkdir(parents=True, exist_ok=True)
    for i, client in enumerate(names):
        rng = np.random.default_rng([SEED, i])
        scale = np.float32(NOISE * (ATTACK if i % BYZANTINE_EVERY == 0 else 1.0))
        tensors = {k: a + scale * rng.standard_normal(a.shape, np.float32) for k, a in base.items()}
        body = tensors_to_safetensors(tensors, {"num_examples": str(rng.integers(100, 1000))})
        path(STRATEGIES[0], client).write_bytes(body)  # straight to disk, no fsync
    for strategy in STRATEGIES[1:]:  # the same files in every job
        path(strategy, "x").parent.mkdir(parents=True, exist_ok=True)
        for client in names:
            os.link(path(STRATEGIES[0], client), path(strategy, client))
    for strategy in STRATEGIES:
        synth.seal_round(store, specs[strategy], synth.ROUND, names)
    seconds = time.perf_counter() - start
    return {
        "clients": clients,
        "params": params,
        "seconds": seconds,
        "gib": clients * params * 4 / 2**30,
    }


def _client(i: int) -> str:
    return f"client-{i:06d}"


def _byzantine(clients: int) -> int:
    return len(range(0, clients, BYZANTINE_EVERY))


def _paths(root: Path, strategy: str) -> tuple[list[str], list[Path]]:
    """The sealed round's clients in the seal's order and their update files."""
    import synth

    from microfl.jobs import load_job
    from microfl.rounds import Rounds, update_key
    from microfl.store import FileStore

    store = FileStore(root)
    sealed = Rounds(store, load_job(store, _job(strategy))).seal(synth.ROUND)
    assert sealed is not None
    clients = list(sealed.clients)
    return clients, [store.root / update_key(_job(strategy), synth.ROUND, c) for c in clients]


def flower(root: Path, strategy: str) -> dict[str, Any]:
    _extra_path()
    import numpy as np
    from flower_compare import flower_inputs
    from flwr.server.strategy.aggregate import aggregate_median, aggregate_trimmed_avg
    from flwr.serverapp.strategy.multikrum import select_multikrum
    from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords

    clients, paths = _paths(root, strategy)
    api = "arrayrecords" if strategy == "krum" else "aggregate"
    kept: dict[str, Any] = {}

    def work() -> dict[str, Any]:
        start = time.perf_counter()
        names, items = flower_inputs(paths, api)
        kept["load"] = time.perf_counter() - start
        start = time.perf_counter()
        if strategy == "median":
            result = dict(zip(names, aggregate_median(items), strict=True))
        elif strategy == "trimmed-mean":
            result = dict(zip(names, aggregate_trimmed_avg(items, BETA), strict=True))
        else:
            chosen = select_multikrum(
                items, num_malicious_nodes=_byzantine(len(items)), num_nodes_to_select=1
            )
            record = aggregate_arrayrecords(chosen, "num-examples")
            result = {k: record[k].numpy() for k in names}
            kept["selected"] = [clients[i] for i, it in enumerate(items) for c in chosen if it is c]
        kept["call"] = time.perf_counter() - start
        kept["result"] = result
        return {}

    got = procstat.measured(work)
    result = kept.pop("result")
    np.savez(root / f"flower-{strategy}.npz", **result)
    return {
        **got,
        "load_seconds": kept["load"],
        "call_seconds": kept["call"],
        "dtype": str(next(iter(result.values())).dtype),
        "selected": kept.get("selected"),
    }


def verify(root: Path, strategy: str) -> dict[str, Any]:
    """The committed model against Flower's (float32) and a float64 numpy reference."""
    import numpy as np
    import synth

    from microfl.jobs import model_key
    from microfl.serde import tensors_from_safetensors
    from microfl.store import FileStore

    clients, paths = _paths(root, strategy)
    data = FileStore(root).read(model_key(_job(strategy), synth.ROUND))
    if data is None:
        raise RuntimeError(f"job {_job(strategy)} has no committed model 1")
    ours = _flat(tensors_from_safetensors(data)[0])
    with np.load(root / f"flower-{strategy}.npz") as f:
        theirs = _flat({k: f[k] for k in f.files})
    out: dict[str, Any] = {"vs_flower": _compare(ours, theirs)}
    if strategy == "krum":
        picks = _krum_reference(paths, _byzantine(len(paths)))
        out["reference_pick"] = clients[picks["order"][0]]
        out["reference_margin"] = picks["margin"]
        out["microfl_pick"] = [
            c for c, x in zip(clients, _rows(paths), strict=True) if _same(x, ours)
        ]
        flower_pick = [c for c, x in zip(clients, _rows(paths), strict=True) if _same(x, theirs)]
        out["flower_pick"] = flower_pick
        detail = (
            f"exact float64 Krum picks {out['reference_pick']} (next best score "
            f"{picks['margin']:.1e} relatively higher); Micro-FL's model is the update of "
            f"{out['microfl_pick'] or 'no client'}, Flower's of {flower_pick or 'no client'}"
        )
    else:
        reference = _reference(paths, strategy, ours.size)
        out["vs_reference"] = _compare(ours, reference)
        out["flower_vs_reference"] = _compare(theirs, reference)
        detail = (
            f"Micro-FL vs float64 numpy reference: {_say(out['vs_reference'])}; Flower vs the "
            f"reference: {_say(out['flower_vs_reference'])}"
        )
    out["same_as_flower"] = out["vs_flower"]["differing"] == 0
    out["summary"] = _say(out["vs_flower"])
    out["detail"] = detail
    return out


def _flat(tensors: dict[str, Any]) -> Any:
    """One float32 vector, tensors in name order (the order of a safetensors body)."""
    import numpy as np

    return np.concatenate([np.asarray(tensors[k], np.float32).ravel() for k in sorted(tensors)])


def _compare(a: Any, b: Any) -> dict[str, Any]:
    """How far apart two float32 vectors are: values differing, and the most ulps apart."""
    import numpy as np

    def ordered(x: Any) -> Any:  # float32 bits as integers in the order of the floats
        i = x.view(np.int32).astype(np.int64)
        return np.where(i < 0, -(i & 0x7FFFFFFF), i)

    ulps = np.abs(ordered(a) - ordered(b))
    scale = float(np.max(np.abs(b.astype(np.float64))))
    return {
        "values": int(a.size),
        "differing": int(np.count_nonzero(ulps)),
        "max_ulp": int(ulps.max()),
        "ulps": dict(zip(*(v.tolist() for v in np.unique(ulps, return_counts=True)), strict=True))
        if ulps.max() <= 8
        else None,  # how many values are 0, 1, 2... ulps apart
        "max_abs_over_max": float(np.max(np.abs(a.astype(np.float64) - b)) / scale),
        "bytes_equal": bool(a.tobytes() == b.tobytes()),
    }


def _say(c: dict[str, Any]) -> str:
    """Ulps alone mislead near zero (a value of 1e-4 has tiny ulps): also the largest
    difference relative to the largest value."""
    if c["bytes_equal"]:
        return f"identical bytes ({c['values']:,} values)"
    return (
        f"{c['differing']:,} of {c['values']:,} values differ, at most {c['max_ulp']} ulp, "
        f"max |diff| {c['max_abs_over_max']:.1e} of the largest value"
    )


def _rows(paths: list[Path]) -> list[Any]:
    """Every update's flat float32 parameters, memory-mapped (nothing read until used)."""
    import numpy as np

    out = []
    for path in paths:
        with open(path, "rb") as f:
            start = 8 + int.from_bytes(f.read(8), "little")
        out.append(np.memmap(path, np.float32, "r", offset=start))
    return out


def _same(x: Any, y: Any) -> bool:
    return bool(x.shape == y.shape and x.tobytes() == y.tobytes())


def _blocks(paths: list[Path], size: int, width: int = 1 << 15) -> Any:
    """(lo, hi, N x (hi - lo) float64 matrix of those coordinates of every update)."""
    import numpy as np

    rows = _rows(paths)
    for lo in range(0, size, width):
        hi = min(size, lo + width)
        yield lo, hi, np.stack([r[lo:hi] for r in rows]).astype(np.float64)


def _reference(paths: list[Path], strategy: str, size: int) -> Any:
    """The coordinate-wise median or trimmed mean in float64, rounded once to float32."""
    import numpy as np

    out = np.empty(size, np.float32)
    n = len(paths)
    cut = int(BETA * n)
    for lo, hi, x in _blocks(paths, size):
        if strategy == "median":
            out[lo:hi] = np.median(x, axis=0)
        else:
            out[lo:hi] = np.sort(x, axis=0)[cut : n - cut].mean(axis=0)
    return out


def _krum_reference(paths: list[Path], f: int) -> dict[str, Any]:
    """Krum's scores with float64 squared distances (sum of the n - f - 2 smallest distances to
    others); the clients in score order and how much higher the runner-up's score is."""
    import numpy as np

    n = len(paths)
    gram = np.zeros((n, n))
    size = _rows(paths[:1])[0].size
    for _lo, _hi, x in _blocks(paths, size):
        gram += x @ x.T
    norms = np.diag(gram)
    distances = norms[:, None] + norms[None, :] - 2 * gram
    np.fill_diagonal(distances, np.inf)
    k = max(1, n - f - 2)
    scores = np.sort(distances, axis=1)[:, :k].sum(axis=1)
    order = np.argsort(scores, kind="stable")
    best, second = scores[order[0]], scores[order[1]]
    return {"order": [int(i) for i in order], "margin": float((second - best) / best)}


if __name__ == "__main__":
    procstat.step_main(generate, flower, verify)
