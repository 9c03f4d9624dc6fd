"""Candidate changes to functions/microfl, as copies measured beside the code they would replace.

Nothing here is used by the platform: the benchmarks time these next to the real functions in
the same run and check that they give byte-identical results, to show what each change would
gain. The real change belongs in functions/ (see results/README.md, "Recommended changes").

- fold_blocked: strategy.fold in cache-sized blocks. The current fold allocates a float64 copy of
  the whole update (scratch = update * weight) and then adds it: for a 10M-parameter model that
  is an 80 MB allocation (fresh pages, page faults) and 3 passes over memory per update. Blocks
  of BLOCK elements keep the scratch in L2; the arithmetic is the same, element by element, so
  the sums are bit-identical.
- partial_bytes: aggregate._partial_bytes with (1) fold_blocked, (2) the NaN/Inf check done once
  per chunk on the float64 sum instead of once per update (a float64 sum of float32 values
  times weights <= 1e12 cannot overflow, so it is finite exactly when every update is; a chunk
  whose sum is not finite is folded again the current way, update by update, to name the bad
  ones), (3) updates read through mmap when the store is a FileStore (no copy of the file into
  a fresh bytes object), and (4) the partial serialised with one copy instead of three.
- count_updates / seal_reason: the quorum check of finalize.seal (finalize._seal_reason)
  counts the round's updates with one os.scandir of their folder instead of FileStore.list
  (os.walk, a relative path and a startswith test per file, then a sort); the client list is
  still built by finalize.seal, once, when it seals.
The dispatcher's idle wait (an ordered KafkaSource delivered at most ~10 records/s from a
backlog) and the local proxy's Nagle delay (40 ms per request) were measured here too; both fixes
are now in microfl.local.dispatcher and microfl.local.serving, so as is and patched share them.

install() puts the function-side changes in place (patched_main.py calls it in every function
instance of the patched runs).
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Mapping
from typing import Any

import numpy as np

from microfl import finalize
from microfl.backends import Backends
from microfl.errors import MicroFLError, SchemaMismatch
from microfl.jobs import (
    MAX_EXAMPLES,
    JobSpec,
    Seal,
    load_job,
    partial_key,
    round_opened_at,
    seal_key,
    update_key,
    updates_prefix,
    validate_update,
)
from microfl.serde import DTYPES, dtype_code, json_to_bytes, tensors_from_safetensors
from microfl.store import FileStore, ObjectStore
from microfl.strategy import fold

__all__ = [
    "BLOCK",
    "compute_partial",
    "count_updates",
    "fold_blocked",
    "install",
    "partial_bytes",
    "read_view",
    "seal",
    "seal_reason",
    "tensors_to_safetensors_1copy",
    "validate_schema",
]

BLOCK = 1 << 14  # float64 elements: 128 KiB of scratch, with the blocks it touches < L2

Tensors = dict[str, np.ndarray]


def fold_blocked(acc: Tensors | None, update: Mapping[str, np.ndarray], weight: float) -> Tensors:
    """acc + weight * update in float64, in place, BLOCK elements at a time."""
    if acc is None:
        acc = {name: np.zeros(arr.shape, dtype=np.float64) for name, arr in update.items()}
    scratch = np.empty(BLOCK, dtype=np.float64)
    for name, arr in update.items():
        src, dst = arr.reshape(-1), acc[name].reshape(-1)
        for start in range(0, src.size, BLOCK):
            end = min(start + BLOCK, src.size)
            buf = scratch[: end - start]
            np.copyto(buf, src[start:end])  # the cast alone is a fast loop; a casting
            np.multiply(buf, weight, out=buf)  # multiply (dtype=float64) is half as fast
            np.add(dst[start:end], buf, out=dst[start:end])
    return acc


def validate_schema(spec: JobSpec, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> int:
    """jobs.validate_update without the per-update NaN/Inf scan (same checks, same messages)."""
    raw = metadata.get("num_examples")
    if raw is None or not raw.isdigit() or not 0 < int(raw) <= MAX_EXAMPLES:
        return validate_update(spec, tensors, metadata)  # raises with the usual message
    expected = {t.name: t for t in spec.schema}
    if set(expected) != set(tensors):
        return validate_update(spec, tensors, metadata)
    for name, t in expected.items():
        arr = tensors[name]
        if arr.shape != t.shape or arr.dtype != DTYPES[t.dtype]:
            return validate_update(spec, tensors, metadata)
    return int(raw)


def read_view(store: ObjectStore, key: str) -> bytes | memoryview | None:
    """The object under key: an mmap of the file for a FileStore (objects are never rewritten,
    only created whole and, rarely, unlinked, which leaves a mapping intact), else read()."""
    if not isinstance(store, FileStore):
        return store.read(key)
    try:
        with open(store._path(key), "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                return b""
            return memoryview(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ))
    except FileNotFoundError:
        return None


def tensors_to_safetensors_1copy(
    tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> bytearray:
    """serde.tensors_to_safetensors's exact bytes, written into one preallocated buffer."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in sorted(metadata.items())}
    offset = 0
    arrays = []
    for name in sorted(tensors):
        arr = np.asarray(tensors[name], order="C")
        code = dtype_code(arr.dtype)
        arr = arr.astype(DTYPES[code], copy=False)
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        arrays.append((offset, arr))
        offset += arr.nbytes
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = bytearray(8 + len(head) + offset)
    out[:8] = struct.pack("<Q", len(head))
    out[8 : 8 + len(head)] = head
    base = 8 + len(head)
    for start, arr in arrays:
        view = np.frombuffer(out, dtype=arr.dtype, count=arr.size, offset=base + start)
        np.copyto(view, arr.reshape(-1))
    return out


def partial_bytes(b: Backends, job: str, r: int, clients: tuple[str, ...]) -> bytearray:
    """aggregate._partial_bytes with the changes of this module; byte-identical output."""
    spec = load_job(b.store, job)
    acc: Tensors | None = None
    examples: list[list] = []
    excluded: list[list] = []
    for client in clients:
        data = read_view(b.store, update_key(job, r, client))
        if data is None:
            excluded.append([client, "update object is missing from storage"])
            continue
        try:
            tensors, metadata = tensors_from_safetensors(data)
            n = validate_schema(spec, tensors, metadata)
        except MicroFLError as exc:
            excluded.append([client, f"stored update is invalid: {exc}"])
            continue
        acc = fold_blocked(acc, tensors, float(n))
        examples.append([client, n])
    if acc is not None and not all(bool(np.isfinite(a).all()) for a in acc.values()):
        return _partial_bytes_checked(b, spec, job, r, clients)  # some update has NaN/Inf
    if acc is None:
        acc = {t.name: np.zeros(t.shape, dtype=np.float64) for t in spec.schema}
    return tensors_to_safetensors_1copy(acc, _metadata(examples, excluded))


def _partial_bytes_checked(
    b: Backends, spec: JobSpec, job: str, r: int, clients: tuple[str, ...]
) -> bytearray:
    """The slow path, as aggregate does it today: validate each update before folding it."""
    acc: Tensors | None = None
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
    if acc is None:
        acc = {t.name: np.zeros(t.shape, dtype=np.float64) for t in spec.schema}
    return tensors_to_safetensors_1copy(acc, _metadata(examples, excluded))


def _metadata(examples: list[list], excluded: list[list]) -> dict[str, str]:
    return {
        "examples": json_to_bytes(examples).decode(),
        "excluded": json_to_bytes(excluded).decode(),
        "num_examples": str(sum(n for _, n in examples)),
    }


def compute_partial(b: Backends, job: str, r: int, chunk: int) -> None:
    """aggregate.compute_partial with partial_bytes (no failpoints, no event)."""
    key = partial_key(job, r, chunk)
    if b.store.exists(key):
        return
    sealed = b.store.read(seal_key(job, r))
    if sealed is None:
        raise SchemaMismatch(f"round {r} of job {job!r} is not sealed")
    seal = Seal.from_bytes(sealed)
    b.store.create(key, partial_bytes(b, job, r, seal.chunk(chunk)))  # type: ignore[arg-type]


def count_updates(store: ObjectStore, job: str, r: int) -> int:
    """How many updates round r holds, for the quorum test: one directory scan on a FileStore."""
    if not isinstance(store, FileStore):
        return len(store.list(updates_prefix(job, r)))
    try:
        with os.scandir(store._path(updates_prefix(job, r).rstrip("/"))) as entries:
            return sum(1 for e in entries if not e.name.startswith(".tmp-"))
    except FileNotFoundError:
        return 0


def seal_reason(b: Backends, spec: JobSpec, r: int) -> str | None:
    """finalize._seal_reason, counting the updates with count_updates."""
    count = count_updates(b.store, spec.job, r)
    if count >= spec.min_clients:
        return "quorum"
    opened = round_opened_at(b.store, spec, r)
    if count and opened is not None and b.clock() >= opened + spec.round_timeout:
        return "deadline"
    return None


def seal(
    b: Backends, spec: JobSpec, r: int, trigger: str, resend_after: float | None = None
) -> Seal | None:
    """finalize.seal with seal_reason in place of finalize._seal_reason (for a timing in this
    process; install() replaces it for good in a function instance)."""
    original = finalize._seal_reason
    finalize._seal_reason = seal_reason  # type: ignore[assignment]
    try:
        return finalize.seal(b, spec, r, trigger, resend_after)
    finally:
        finalize._seal_reason = original  # type: ignore[assignment]


def install() -> None:
    """Put the function-side changes in place in this process."""
    from microfl import aggregate

    aggregate._partial_bytes = partial_bytes  # type: ignore[assignment]
    finalize._seal_reason = seal_reason  # type: ignore[assignment]
