"""Helpers shared by the data-plane tests: models, updates, jobs, tokens, the FedAvg check."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import numpy as np
import requests

from microfl.jobs import JobSpec, create_job, load_job, model_key
from microfl.local.reference import fedavg, fedavg_mismatch
from microfl.rounds import update_key
from microfl.serde import tensors_to_safetensors
from microfl.store import FileStore, ObjectStore
from microfl.tokens import issue_token

Update = tuple[dict[str, np.ndarray], int]

SECRET = "test-secret-0123456789abcdef-0123456789"


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    """Poll check() until it holds; fail naming what did not happen within timeout seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f}s: {what}"
        time.sleep(0.02)


def make_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "fc1.weight": rng.standard_normal((32, 16)).astype(np.float32),
        "fc1.bias": np.zeros(32, np.float32),
        "fc2.weight": rng.standard_normal((10, 32)).astype(np.float32),
    }


def make_updates(
    model: dict[str, np.ndarray], n: int, seed: int = 1
) -> dict[str, tuple[dict[str, np.ndarray], int]]:
    rng = np.random.default_rng(seed)
    return {
        f"client-{i:03d}": (
            {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in model.items()},
            int(rng.integers(1, 500)),
        )
        for i in range(n)
    }


def update_bytes(tensors: dict[str, np.ndarray], n: int) -> bytes:
    return tensors_to_safetensors(tensors, {"num_examples": str(n)})


def new_job(store: ObjectStore, model: dict[str, np.ndarray], **options: object) -> str:
    job = f"job-{uuid.uuid4().hex[:8]}"
    spec = JobSpec.for_model(job, model, created_at=time.time(), **options)  # type: ignore[arg-type]
    create_job(store, spec, tensors_to_safetensors(model))
    return job


def auth(job: str, client: str | None = None, **kw: object) -> dict[str, str]:
    token = issue_token(SECRET.encode(), job, client, **kw)  # type: ignore[arg-type]
    return {"Authorization": f"Bearer {token}"}


def assert_fedavg(
    model: dict[str, np.ndarray],
    updates: Mapping[str, Update] | Iterable[Update],
) -> None:
    """model is the FedAvg of updates ({client: (tensors, num_examples)} or the pairs alone)
    within DESIGN invariant 7's tolerance, in the updates' dtypes."""
    pairs = list(updates.values() if isinstance(updates, Mapping) else updates)
    like = pairs[0][0]
    assert {k: a.dtype for k, a in model.items()} == {k: a.dtype for k, a in like.items()}
    problem = fedavg_mismatch(model, fedavg(pairs))
    assert problem is None, problem


def healthy_run(store: ObjectStore, job: str, r: int = 1) -> None:
    """Commit round r of a job whose updates are already stored, in-process with no faults:
    the reference that faulty runs must match byte for byte."""
    from microfl import aggregate, finalize
    from microfl.backends import Backends
    from microfl.bus import MemoryBus

    bus = MemoryBus()
    b = Backends(store, bus, SECRET.encode())
    finalize.seal(b, load_job(store, job), r, trigger="reference", listing=True)
    while bus.events:
        topic, event, _ = bus.events.pop(0)
        if topic == "microfl.aggregate":
            aggregate.handle(b, event)
        elif topic == "microfl.finalize":
            finalize.handle(b, event)


def reference(store: FileStore, job: str, tmp: Path, clients: list[str]) -> FileStore:
    """The same job and updates in a fresh store, committed in-process without faults."""
    ref = FileStore(tmp)
    spec = load_job(store, job)
    create_job(ref, spec, store.read(model_key(job, 0)) or b"")
    for client in clients:
        ref.create(update_key(job, 1, client), store.read(update_key(job, 1, client)) or b"")
    healthy_run(ref, job)
    return ref


def post_all(url: str, job: str, updates: dict) -> None:
    for client, (tensors, n) in updates.items():
        answer = requests.post(
            f"{url}/v1/jobs/{job}/rounds/1/updates",
            data=update_bytes(tensors, n),
            headers=auth(job, client),
            timeout=30,
        )
        assert answer.status_code == 202, answer.text
