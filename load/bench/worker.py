"""One step of a benchmark in a process of its own, so that the peak RSS it reports belongs to
that step alone. Prints one JSON object on the last line of stdout.

    worker.py generate ROOT JOB --clients N --fan-in K --seed S   job, N updates, the seal
    worker.py aggregate ROOT JOB                                   every tree node of round 1
    worker.py finalize ROOT JOB                                    commit round 1
    worker.py verify ROOT JOB                                      model 1 == numpy FedAvg

The parent must stay small: on Linux a child started with vfork/fork keeps the parent's RSS high
water mark in ru_maxrss across exec, so `vm_hwm_mib` (the child's own address space) is reported
as a cross-check."""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import procstat
import synth

from microfl.backends import Backends
from microfl.bus import MemoryBus
from microfl.finalize import commit
from microfl.jobs import JobSpec, create_job, load_job, model_key
from microfl.local.reference import TOLERANCE, fedavg, fedavg_error
from microfl.rounds import record_key, update_key, updates_prefix
from microfl.serde import json_from_bytes, tensors_to_safetensors
from microfl.store import FileStore

ROUND = 1
MODEL = {"dense.weight": (1000, 1000), "dense.bias": (1000,)}  # 1,001,000 float32 parameters
NOISE = np.float32(0.01)  # each client's model: the global model plus its own noise


def _peak_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


def _measured(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run work after the imports; its wall time, the RSS before it and the peak RSS after."""
    baseline = procstat.status_mib("VmRSS") or _peak_mib()
    start = time.perf_counter()
    info = work()
    seconds = time.perf_counter() - start
    peak = _peak_mib()
    return {
        **info,
        "baseline_mib": baseline,
        "peak_mib": peak,
        "work_mib": peak - baseline,
        "vm_hwm_mib": procstat.status_mib("VmHWM"),
        "seconds": seconds,
    }


def generate(
    root: str, job: str, clients: int = 10, fan_in: int = 10, seed: int = 0
) -> dict[str, Any]:
    store = FileStore(root)
    rng = np.random.default_rng(seed)
    model = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in MODEL.items()}
    spec = JobSpec.for_model(job, model, rounds=1, min_clients=clients, fan_in=fan_in)
    create_job(store, spec, tensors_to_safetensors(model))
    start = time.perf_counter()
    names = []
    for i in range(clients):
        client_rng = np.random.default_rng([seed, i])
        update = {
            name: arr + NOISE * client_rng.standard_normal(arr.shape, dtype=np.float32)
            for name, arr in model.items()
        }
        metadata = {"num_examples": str(int(client_rng.integers(1, 1000)))}
        name = f"client-{i:06d}"
        store.create(update_key(job, ROUND, name), tensors_to_safetensors(update, metadata))
        names.append(name)
    seal = synth.seal_round(store, spec, ROUND, names)
    return {
        "seconds": time.perf_counter() - start,
        "leaves": seal.tree.sizes[0],
        "nodes": sum(seal.tree.sizes),
        "params": sum(arr.size for arr in model.values()),
        "model_bytes": sum(arr.nbytes for arr in model.values()),
    }


def aggregate(root: str, job: str) -> dict[str, Any]:
    """Every node of the sealed round's tree, one after another (numba's kernels loaded or
    compiled before the measured work, as in a warm instance)."""
    b = Backends(FileStore(root), MemoryBus())
    spec = load_job(b.store, job)
    warm = synth.warm_kernels()

    def work() -> dict[str, Any]:
        nodes = synth.build_tree(b, spec, ROUND)
        events = len(b.bus.events)  # type: ignore[attr-defined]
        return {"nodes": nodes, "events": events, "warm_up_seconds": warm}

    return _measured(work)


def finalize(root: str, job: str) -> dict[str, Any]:
    b = Backends(FileStore(root), MemoryBus())

    def work() -> dict[str, Any]:
        if not commit(b, load_job(b.store, job), ROUND):
            raise RuntimeError(f"round {ROUND} of job {job!r} could not be committed")
        return {}

    return _measured(work)


def verify(root: str, job: str) -> dict[str, Any]:
    """Model 1 against the exact FedAvg (microfl.local.reference) of the stored updates, read
    with the safetensors package rather than microfl's own parser."""
    from safetensors.numpy import load

    store = FileStore(root)
    keys = store.list(updates_prefix(job, ROUND))
    weight = 0

    def updates() -> Iterator[tuple[dict[str, np.ndarray], int]]:
        nonlocal weight
        for key in keys:
            data = store.read(key)
            assert data is not None
            n = _num_examples(data)
            weight += n
            yield load(data), n

    exact = fedavg(updates())
    model_bytes = store.read(model_key(job, ROUND))
    record_bytes = store.read(record_key(job, ROUND))
    assert model_bytes is not None and record_bytes is not None, "finalize wrote neither"
    error = fedavg_error(load(model_bytes), exact)
    record = json_from_bytes(record_bytes)
    problems = []
    if error > TOLERANCE:
        problems.append(f"model 1 is {error:.2e} of the largest weight from the exact FedAvg")
    if len(record["included"]) != len(keys) or record["num_examples"] != weight:
        problems.append(
            f"the round record includes {len(record['included'])} updates and "
            f"{record['num_examples']} examples; storage holds {len(keys)} and "
            f"{weight}"
        )
    if problems:
        raise RuntimeError("; ".join(problems))
    return {"max_relative_error": error, "updates": len(keys), "num_examples": weight}


def _num_examples(data: bytes) -> int:
    header = json.loads(data[8 : 8 + int.from_bytes(data[:8], "little")])
    return int(header["__metadata__"]["num_examples"])


if __name__ == "__main__":
    procstat.step_main(generate, aggregate, finalize, verify)
