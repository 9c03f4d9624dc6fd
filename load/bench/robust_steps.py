"""The child processes of robust_compare, one step each (procstat.step_main): the updates, Flower's
robust aggregation, Micro-FL's coordinate shards, and the checks of the models.

- flower: flwr 1.42.0's own code on all N updates in memory, as its API takes them:
  flwr.server.strategy.aggregate.aggregate_median and aggregate_trimmed_avg (what FedMedian and
  FedTrimmedAvg call) on a list of (ndarrays, num_examples); for Krum the message API's
  select_multikrum + aggregate_arrayrecords (what flwr.serverapp.strategy.Krum.aggregate_train
  calls) on RecordDicts. The legacy aggregate_krum computes the N^2 distances in a Python loop
  over 1M-vectors (about half an hour at 1,000 clients), so it is left out.
- microfl_instance, microfl: shards.build_shard for one shard, or for all and finalize.commit.
- verify: Micro-FL's model against Flower's and against float64 numpy references."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import procstat
from round_latency import _extra_path

__all__ = ["flower", "generate", "microfl", "microfl_instance", "verify"]

STRATEGIES = ("median", "trimmed-mean", "krum")
BETA = 0.1  # Micro-FL's default; Flower's FedTrimmedAvg defaults to 0.2, so both get this
BYZANTINE_EVERY = 10  # client i is Byzantine when i % 10 == 0; krum's f is their number
ATTACK = 100.0  # a Byzantine update's noise, in multiples of an honest one's
NOISE = 0.01
SEED = 20261202
FAN_IN = 10


def _job(strategy: str) -> str:
    return f"robust-{strategy}"


def generate(root: Path, clients: int, params: int, budget_mib: int) -> dict[str, Any]:
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
            memory_budget=budget_mib << 20,
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
        "budget_mib": budget_mib,
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


def _round(root: Path, strategy: str) -> tuple[Any, Any, Any, Any]:
    """(Backends on the FileStore, the job's spec, its sealed round, the shard layout)."""
    import synth

    from microfl import shards
    from microfl.backends import Backends
    from microfl.bus import MemoryBus
    from microfl.jobs import load_job
    from microfl.rounds import Rounds
    from microfl.store import FileStore

    b = Backends(FileStore(root), MemoryBus())
    spec = load_job(b.store, _job(strategy))
    sealed = Rounds(b.store, spec).seal(synth.ROUND)
    assert sealed is not None
    return b, spec, sealed, shards.layout(spec, sealed)


def microfl_instance(root: Path, strategy: str) -> dict[str, Any]:
    """One aggregate instance's work for one shard: shards.build_shard of level 0, shard 0 (the
    widest: the last one may be narrower), in this fresh process; then its node is deleted so
    that the all-shards run builds it again."""
    import synth

    from microfl import shards
    from microfl.rounds import node_key

    b, spec, _sealed, lay = _round(root, strategy)

    def work() -> dict[str, Any]:
        if not shards.build_shard(b.store, spec, synth.ROUND, 0, 0):
            raise RuntimeError("shard 0 existed already")
        return {}

    got = procstat.measured(work)
    b.store.delete(node_key(spec.job, synth.ROUND, 0, 0))
    return {
        **got,
        "shard": "level 0, shard 0",
        "width": lay.width,
        "budget_mib": spec.memory_budget / 2**20,
        "matrix_mib": lay.clients * lay.width * 8 / 2**20,  # the (N, width) float64 slice
    }


def microfl(root: Path, strategy: str) -> dict[str, Any]:
    """The whole robust round in this process, as the instances would do it one after another:
    every shard of level 0 (shards.build_shard), for Krum finalize's selection (shards.missing
    writes it once level 0 is complete) and every shard of level 1, then finalize.commit."""
    import synth

    from microfl import shards
    from microfl.finalize import commit
    from microfl.rounds import Rounds

    b, spec, sealed, lay = _round(root, strategy)
    times: list[list[float]] = [[] for _ in range(lay.levels)]
    phases: dict[str, float] = {"select_seconds": 0.0}

    def work() -> dict[str, Any]:
        for level in range(lay.levels):
            if level == 1:  # Krum: the selection, finalize's work between the levels
                start = time.perf_counter()
                if shards.missing(Rounds(b.store, spec), sealed) != [
                    (1, j) for j in range(lay.count)
                ]:
                    raise RuntimeError("level 0 is incomplete after building every shard")
                phases["select_seconds"] = time.perf_counter() - start
            for j in range(lay.count):
                start = time.perf_counter()
                if not shards.build_shard(b.store, spec, synth.ROUND, level, j):
                    raise RuntimeError(f"shard {level}/{j} existed already")
                times[level].append(time.perf_counter() - start)
        start = time.perf_counter()
        if not commit(b, spec, synth.ROUND):
            raise RuntimeError(f"finalize.commit did not commit round 1 of {spec.job}")
        phases["commit_seconds"] = time.perf_counter() - start
        return {}

    got = procstat.measured(work)
    record = Rounds(b.store, spec).record(synth.ROUND) or {}
    return {
        **got,
        **phases,
        "shards": lay.count * lay.levels,
        "levels": lay.levels,
        "width": lay.width,
        "shard_seconds": times,  # per level
        "parallel_seconds": sum(max(t) for t in times) + sum(phases.values()),
        "included": len(record.get("included", [])),
        "selected": record.get("selected"),
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
        out["as_reference"] = out["microfl_pick"] == [out["reference_pick"]]
        out["reference_summary"] = f"picks {out['microfl_pick']}, the exact choice " + (
            "too" if out["as_reference"] else f"is {out['reference_pick']}"
        )
        detail = (
            f"Krum with float64 distances picks {out['reference_pick']} (the runner-up's "
            f"score is {picks['margin']:.1e} relatively higher); Micro-FL's model is the "
            f"update of {out['microfl_pick'] or 'no client'}, Flower's of "
            f"{flower_pick or 'no client'}"
        )
    else:
        reference = _reference(paths, strategy, ours.size)
        out["vs_reference"] = _compare(ours, reference)
        out["flower_vs_reference"] = _compare(theirs, reference)
        out["as_reference"] = out["vs_reference"]["bytes_equal"]
        out["reference_summary"] = _say(out["vs_reference"])
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
    origin = np.asarray(_rows(paths[:1])[0], np.float64)
    for lo, hi, x in _blocks(paths, size):
        x -= origin[lo:hi]  # centred on update 0: the Gram form then cancels little
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
    procstat.step_main(generate, flower, microfl_instance, microfl, verify)
