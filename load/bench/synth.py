"""Models and client updates for the benchmarks, made cheaply and reproducibly (imported by child
processes only: it imports numpy).

A model of P float32 parameters is a dense layer: weight (rows, P/rows - 1) and bias (rows,).
Client i sends one of POOL distinct tensor sets, pool[i % POOL], with its own num_examples, so
every body is distinct (the header differs) while making N bodies costs N header edits and
copies rather than N random draws, and the exact FedAvg is a float64 sum over POOL terms."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from microfl.backends import Backends
from microfl.jobs import JobSpec, create_job
from microfl.local.reference import fedavg
from microfl.rounds import Rounds, Seal, update_key
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore, ObjectStore

__all__ = [
    "JOB",
    "POOL",
    "ROUND",
    "Updates",
    "build_tree",
    "model",
    "seal_round",
    "shapes",
    "warm_kernels",
    "write_round",
]

JOB = "bench"
ROUND = 1
POOL = 16
NOISE = 0.01
_PLACEHOLDER = "999"  # num_examples in a template body; every client's has three digits too
_BASE_PLACEHOLDER = "000000000"  # base_version, always written with 9 digits


def shapes(params: int) -> dict[str, tuple[int, ...]]:
    rows = 100 if params < 1_000_000 else 1000
    cols = params // rows - 1
    if rows * cols + rows != params:
        raise ValueError(f"{params} parameters do not make a ({rows}, n) weight plus a bias")
    return {"dense.weight": (rows, cols), "dense.bias": (rows,)}


def model(params: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        name: rng.standard_normal(shape, dtype=np.float32) for name, shape in shapes(params).items()
    }


class Updates:
    """The updates of n clients for a model; body(i) is client i's safetensors upload. With
    versioned, bodies carry an async job's base_version (body(i, base))."""

    def __init__(
        self, base: dict[str, np.ndarray], n: int, seed: int = 1, versioned: bool = False
    ) -> None:
        rng = np.random.default_rng(seed)
        self.n = n
        self.pool = [
            {
                name: arr + np.float32(NOISE) * rng.standard_normal(arr.shape, dtype=np.float32)
                for name, arr in base.items()
            }
            for _ in range(min(POOL, n))
        ]
        self.examples = [int(v) for v in rng.integers(100, 1000, size=n)]  # three digits
        meta = {"num_examples": _PLACEHOLDER}
        if versioned:
            meta["base_version"] = _BASE_PLACEHOLDER
        self._templates = [tensors_to_safetensors(t, meta) for t in self.pool]
        head = self._templates[0][:4096]
        self._at = head.index(b'"num_examples":"' + _PLACEHOLDER.encode()) + 16
        self._base_at = (
            head.index(b'"base_version":"' + _BASE_PLACEHOLDER.encode()) + 16 if versioned else 0
        )

    @property
    def model_bytes(self) -> int:
        return sum(a.nbytes for a in self.pool[0].values())

    def client(self, i: int) -> str:
        return f"client-{i:06d}"

    def tensors(self, i: int) -> dict[str, np.ndarray]:
        return self.pool[i % len(self.pool)]

    def body(self, i: int, base: int = 0) -> bytes:
        """Client i's upload, byte-identical to tensors_to_safetensors(tensors(i), metadata);
        trained on version `base` if versioned (9 digits, zero-padded)."""
        data = bytearray(self._templates[i % len(self.pool)])
        data[self._at : self._at + 3] = str(self.examples[i]).encode()
        if self._base_at:
            at = self._base_at
            data[at : at + len(_BASE_PLACEHOLDER)] = f"{base:09d}".encode()
        return bytes(data)

    def bodies(self) -> Iterator[tuple[str, bytes]]:
        for i in range(self.n):
            yield self.client(i), self.body(i)

    def fedavg(self) -> dict[str, np.ndarray]:
        """The exact FedAvg (microfl.local.reference), over POOL terms: client i sends pool[i %
        POOL], so each pool entry weighs the examples of all its clients."""
        weights = [0] * len(self.pool)
        for i, n in enumerate(self.examples):
            weights[i % len(self.pool)] += n
        return fedavg(zip(self.pool, weights, strict=True))


def write_round(
    root: Path, params: int, clients: int, fan_in: int, seed: int = 0
) -> tuple[FileStore, Updates, float]:
    """A FileStore with job JOB (min_clients = clients), every client's update for round 1 and
    the seal (seal_round): what aggregate and finalize find when the round has been sealed.
    Returns the store, the updates and the seconds the writes took."""
    store = FileStore(root)
    base = model(params, seed)
    updates = Updates(base, clients, seed + 1)
    spec = JobSpec.for_model(
        JOB, base, rounds=1, min_clients=clients, fan_in=fan_in, created_at=time.time()
    )
    create_job(store, spec, tensors_to_safetensors(base))
    start = time.perf_counter()
    for client, body in updates.bodies():
        store.create(update_key(JOB, ROUND, client), body)
    seal_round(store, spec, ROUND, [updates.client(i) for i in range(clients)])
    return store, updates, time.perf_counter() - start


def seal_round(store: ObjectStore, spec: JobSpec, r: int, clients: list[str]) -> Seal:
    """Seal round r over the stored updates of `clients` as if none had claimed a slot: every
    one is in the seal's tail, in sorted order (the leaves are then built after the seal, as
    for updates that arrive while the round closes)."""
    names = tuple(sorted(clients))
    seal = Seal(r, names, spec.fan_in, "quorum", time.time(), "bench", slots=0, tail=names)
    sealed, created = Rounds(store, spec).create_seal(seal)
    if not created:
        raise RuntimeError(f"round {r} of job {spec.job!r} was sealed already")
    return sealed


def build_tree(b: Backends, spec: JobSpec, r: int) -> int:
    """Every node of sealed round r's tree, level by level, as aggregate builds them
    (aggregate.build_node; finalize.commit then merges the top). Returns the number of nodes."""
    from microfl.aggregate import build_node

    sealed = Rounds(b.store, spec).seal(r)
    if sealed is None:
        raise RuntimeError(f"round {r} of job {spec.job!r} is not sealed")
    sizes = sealed.tree.sizes
    for level, n in enumerate(sizes):
        for j in range(n):
            build_node(b, spec, r, level, j)
    return sum(sizes)


def warm_kernels() -> float:
    """Compile (or load from numba's cache) exactsum's kernels for float32 updates in every
    group size aggregate folds, so a timed fold is a warm instance's; returns the seconds."""
    from microfl.aggregate import GROUP
    from microfl.exactsum import ExactSum

    start = time.perf_counter()
    base = {"w": np.ones(16, dtype=np.float32)}
    for n in range(1, GROUP + 1):
        ExactSum(base).fold_many([base] * n, [1] * n)
    return time.perf_counter() - start
