"""The aggregate service: one chunk of a sealed round folded into a partial weighted sum.

Memory holds the float64 accumulator and one update at a time, whatever the round's size."""

from __future__ import annotations

import numpy as np

from microfl import events
from microfl.backends import Backends
from microfl.errors import MicroFLError, PoisonEvent
from microfl.faults import failpoint
from microfl.jobs import Seal, load_job, partial_key, seal_key, update_key, validate_update
from microfl.serde import Event, json_to_bytes, tensors_from_safetensors, tensors_to_safetensors
from microfl.strategy import fold

__all__ = ["compute_partial", "handle"]


def handle(b: Backends, event: Event) -> None:
    if event.type != events.PARTIAL_REQUESTED:
        raise PoisonEvent(f"aggregate takes {events.PARTIAL_REQUESTED}, not {event.type}")
    job, r, chunk = _fields(event)
    compute_partial(b, job, r, chunk)


def _fields(event: Event) -> tuple[str, int, int]:
    try:
        return str(event.data["job"]), int(event.data["round"]), int(event.data["chunk"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonEvent(f"event {event.id}: data needs job, round and chunk ({exc})") from None


def compute_partial(b: Backends, job: str, r: int, chunk: int) -> None:
    key = partial_key(job, r, chunk)
    if not b.store.exists(key):
        sealed = b.store.read(seal_key(job, r))
        if sealed is None:
            raise PoisonEvent(f"round {r} of job {job!r} is not sealed; nothing to aggregate")
        seal = Seal.from_bytes(sealed)
        if not 0 <= chunk < seal.chunks:
            raise PoisonEvent(f"round {r} has {seal.chunks} chunks, not chunk {chunk}")
        b.store.create(key, _partial_bytes(b, job, r, seal.chunk(chunk)))
        failpoint("aggregate.after_partial")
    b.bus.publish([events.partial_ready(job, r, chunk)], key=job)


def _partial_bytes(b: Backends, job: str, r: int, clients: tuple[str, ...]) -> bytes:
    spec = load_job(b.store, job)
    acc = None
    examples: list[list] = []
    excluded: list[list] = []
    for client in clients:
        data = b.store.read(update_key(job, r, client))
        if data is None:
            excluded.append([client, "update object is missing from storage"])
            continue
        try:
            tensors, metadata = tensors_from_safetensors(data)
            n = validate_update(spec, tensors, metadata)
        except MicroFLError as exc:
            excluded.append([client, f"stored update is invalid: {exc}"])
            continue
        acc = fold(acc, tensors, float(n))
        examples.append([client, n])
        failpoint("aggregate.mid_fold")
    if acc is None:  # every update of the chunk excluded: an empty sum
        acc = {t.name: np.zeros(t.shape, dtype=np.float64) for t in spec.schema}
    metadata = {
        "examples": json_to_bytes(examples).decode(),
        "excluded": json_to_bytes(excluded).decode(),
        "num_examples": str(sum(n for _, n in examples)),
    }
    return tensors_to_safetensors(acc, metadata)
