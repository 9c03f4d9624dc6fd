"""The ingest service: what the HTTP function does for each endpoint, free of HTTP itself.

An upload is spooled to a temporary file (in memory while small) as it arrives, then parsed,
checked and stored from there, block by block: one request holds O(block) memory whatever the
update's size, so containerConcurrency uploads of the largest update fit the memory limit."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO, Any

from microfl import events, prometheus
from microfl.backends import Backends
from microfl.buffers import Buffers, base_version, update_id
from microfl.errors import (
    ConflictingUpdate,
    Forbidden,
    RoundNotFound,
    RoundNotOpen,
    Unavailable,
    UpdateTooLarge,
    WrongMode,
)
from microfl.faults import failpoint
from microfl.jobs import JobSpec, check_model, load_job, revoked_key, validate_update
from microfl.rounds import Rounds
from microfl.serde import tensors_from_safetensors_file
from microfl.tokens import Claims, verify_token

__all__ = ["get_job", "get_model", "get_round", "get_version", "post_async_update", "post_update"]

SEAL_WAIT = 10.0  # seconds an upload waits for a seal in progress before answering 503
# Bytes of a body read at a time. gunicorn holds about three times that per read, so with 100
# uploads at once it is a memory budget; smaller reads cost CPU (256 KiB: twice 1 MiB's, in
# load/bench/ingest_memory.py).
BLOCK = 512 * 1024
SPOOL_IN_MEMORY = 64 * 1024  # a body up to this size is not written to a temporary file


def _authorize(b: Backends, job: str, token: str | None) -> tuple[Claims, JobSpec]:
    claims = verify_token(
        b.secret, token, job, now=b.clock(), previous=b.secret_previous, max_ttl=b.max_token_ttl
    )
    spec = load_job(b.store, job)
    if claims.client is not None and b.store.exists(revoked_key(job, claims.client)):
        raise Forbidden(
            f"client {claims.client!r} was revoked from job {job!r} (microfl token revoke); "
            "its tokens no longer admit it: ask the operator"
        )
    return claims, spec


def get_job(b: Backends, job: str, token: str | None) -> dict[str, Any]:
    _, spec = _authorize(b, job, token)
    rounds = Rounds(b.store, spec)
    version = rounds.latest_version()
    current = rounds.open_round(version)
    doc = {
        "job": job,
        "state": "running" if current else "done",
        "open_round": None if spec.is_async else current,
        "model_version": version,
        "rounds": spec.rounds,
        "min_clients": spec.min_clients,
        "round_deadline": spec.round_timeout,
        "strategy": spec.strategy,
        "max_examples": spec.max_examples,
        "mode": spec.mode,
    }
    if spec.is_async:  # `rounds` is the number of versions the job makes
        doc.update(
            buffer=spec.buffer,
            max_staleness=spec.max_staleness,
            staleness_exponent=spec.staleness_exponent,
        )
    return doc


def get_model(
    b: Backends, job: str, token: str | None, version: int | None = None
) -> tuple[bytes, int]:
    _, spec = _authorize(b, job, token)
    rounds = Rounds(b.store, spec)
    latest = rounds.latest_version()
    v = latest if version is None else version
    data = rounds.model(v) if 0 <= v <= latest else None
    if data is None:
        raise RoundNotFound(f"job {job!r} has no model version {v}; the latest is {latest}")
    return check_model(spec, v, data), v


def get_round(b: Backends, job: str, r: int, token: str | None) -> dict[str, Any]:
    claims, spec = _authorize(b, job, token)
    if spec.is_async:
        raise RoundNotFound(
            f"job {job!r} is asynchronous: it has versions, not rounds; "
            f"GET /v1/jobs/{job}/versions/{{v}}"
        )
    rounds = Rounds(b.store, spec)
    doc = rounds.record(r)
    if doc is not None:
        if not claims.admin:  # each client's example count is the operator's business only
            doc.pop("examples", None)
            doc.pop("scores", None)  # Krum's scores: distances between other clients' updates
        return doc
    seal = rounds.seal(r)
    if seal is not None:
        return {
            "round": r,
            "state": "sealed",
            "included": list(seal.clients),
            "excluded": [],
            "reason": seal.reason,
        }
    if r != rounds.open_round():
        raise RoundNotFound(f"round {r} of job {job!r} has not opened")
    received = rounds.slot_count(r)  # updates with a slot: no listing
    return {"round": r, "state": "open", "included": [], "excluded": [], "received": received}


def post_update(
    b: Backends,
    job: str,
    r: int,
    token: str | None,
    read_body: Callable[[int], bytes],
    content_length: int | None,
) -> tuple[int, dict]:
    """Validate, store create-only, announce. 202 new, 200 replay of the same bytes.
    read_body is the request stream's read: up to n more bytes, b"" at the end."""
    spec, client = _uploader(b, job, token, content_length, r)
    with _spooled(read_body, spec.update_limit, job) as (body, size):
        return _store_update(b, spec, r, client, body, size)


def post_async_update(
    b: Backends,
    job: str,
    token: str | None,
    read_body: Callable[[int], bytes],
    content_length: int | None,
) -> tuple[int, dict]:
    """POST /v1/jobs/{job}/updates: an async job's update, trained on __metadata__'s
    base_version. 202 new, 200 replay; the body names the version it counts in."""
    spec, client = _uploader(b, job, token, content_length, None)
    with _spooled(read_body, spec.update_limit, job) as (body, size):
        tensors, metadata = tensors_from_safetensors_file(body, size, spec.header_limit)
        validate_update(spec, tensors, metadata)
        base = base_version(metadata)
        buf = Buffers(b.store, spec)
        stored = _same_as_stored(buf.read_update_to_file, base, client, body)
        created = False
        if stored is None:
            buf.check_fresh(base)
            created = buf.create_update(base, client, body)
            if not created:
                stored = _same_as_stored(buf.read_update_to_file, base, client, body)
            failpoint("ingest.after_update")
        if stored is not None and not stored:
            raise ConflictingUpdate(
                f"client {client!r} already sent a different update trained on version {base}; "
                "an update cannot be changed"
            )
    place = None if created else buf.claim(base, client)
    if place is None:  # new, or a replay whose instance died before it was placed
        taken, place = buf.place(base, client)
        if place is None:
            if created:
                buf.delete_update(base, client)
            raise RoundNotOpen(f"job {job!r} has made all its {spec.rounds} versions")
        failpoint("ingest.after_slot")
        k = spec.fan_in
        if taken is not None and ((taken.slot + 1) % k == 0 or taken.slot == spec.buffer - 1):
            uid = update_id(client, base)
            b.bus.publish([events.update_accepted(job, taken.buffer, uid, taken.slot)], key=job)
    answer = {
        "client": client,
        "base_version": base,
        "update": update_id(client, base),
        "version_buffer": place.buffer,
        "status": "accepted" if created else "replay",
    }
    return (202 if created else 200), answer


def _uploader(
    b: Backends, job: str, token: str | None, content_length: int | None, r: int | None
) -> tuple[JobSpec, str]:
    """(the job, the client) for an upload to round r (None: to an async job)."""
    claims, spec = _authorize(b, job, token)
    if spec.is_async and r is not None:
        raise WrongMode(
            f"job {job!r} is asynchronous: it has no rounds; POST /v1/jobs/{job}/updates "
            "with base_version in __metadata__"
        )
    if not spec.is_async and r is None:
        raise WrongMode(
            f"job {job!r} is synchronous: POST /v1/jobs/{job}/rounds/{{r}}/updates to its "
            f"open round (GET /v1/jobs/{job} names it)"
        )
    if claims.client is None:
        raise Forbidden("updates are posted with a client token, not an admin token")
    limit = spec.update_limit
    if content_length is not None and content_length > limit:
        raise UpdateTooLarge(f"update is {content_length} bytes; job {job!r} takes at most {limit}")
    return spec, claims.client


def get_version(b: Backends, job: str, v: int, token: str | None) -> dict[str, Any]:
    """GET /v1/jobs/{job}/versions/{v} of an async job: version v's record once committed
    (examples and weights for admins only), else the state of the buffer that makes it."""
    claims, spec = _authorize(b, job, token)
    if not spec.is_async:
        raise RoundNotFound(
            f"job {job!r} is synchronous: round r makes version r; GET /v1/jobs/{job}/rounds/{v}"
        )
    rounds = Rounds(b.store, spec)
    doc = rounds.record(v)
    if doc is not None:
        if not claims.admin:
            doc.pop("examples", None)
            doc.pop("weights", None)
        return doc
    if not 1 <= v <= spec.rounds:
        raise RoundNotFound(f"job {job!r} makes versions 1 to {spec.rounds}, not {v}")
    seal = rounds.seal(v)
    if seal is not None:
        return {"version": v, "state": "sealed", "reason": seal.reason, "buffer": spec.buffer}
    received = min(rounds.slot_count(v), spec.buffer)  # slots taken, void ones included
    return {"version": v, "state": "filling", "received": received, "buffer": spec.buffer}


def _store_update(
    b: Backends, spec: JobSpec, r: int, client: str, body: IO[bytes], size: int
) -> tuple[int, dict]:
    """post_update once the body is spooled: it is read from the file, a block at a time. The
    call that creates the update claims its tree slot (replays claim nothing: an update whose
    instance died before claiming gets its position from the seal)."""
    job = spec.job
    tensors, metadata = tensors_from_safetensors_file(body, size, spec.header_limit)
    validate_update(spec, tensors, metadata)

    rounds = Rounds(b.store, spec)
    stored = _same_as_stored(rounds.read_update_to_file, r, client, body)  # None: none stored
    created = False
    if stored is None:
        rounds.require_open(r)
        created = rounds.create_update(r, client, body)
        if not created:
            stored = _same_as_stored(rounds.read_update_to_file, r, client, body)
        failpoint("ingest.after_update")
    if stored is not None and not stored:
        raise ConflictingUpdate(
            f"client {client!r} already sent a different update for round {r}; an update "
            "cannot be changed"
        )
    slot = rounds.claim_slot(r, client) if created else None
    failpoint("ingest.after_slot")
    _settle(rounds, r, client)
    if slot is None:
        # A replay publishes nothing, so a flood of them makes no work. If the instance that
        # stored the update died before announcing it, finalize's sweep or seal finds it.
        return 200, {"round": r, "client": client, "status": "replay"}
    if _wakes_finalize(spec, slot):
        b.bus.publish([events.update_accepted(job, r, client, slot)], key=job)
    return 202, {"round": r, "client": client, "status": "accepted"}


def _wakes_finalize(spec: JobSpec, slot: int) -> bool:
    """Finalize has work for a new update only when its slot fills a leaf (the leaf can be
    folded) or may complete the quorum; the other uploads announce nothing, so finalize's
    ordered stream carries about one event per fan_in updates. Slots are a prefix, so the leaf's
    other slots are taken; a lost announcement is found by the sweep, like any lost event."""
    return (slot + 1) % spec.fan_in == 0 or slot >= spec.min_clients - 1


@contextmanager
def _spooled(
    read_body: Callable[[int], bytes], limit: int, job: str
) -> Iterator[tuple[IO[bytes], int]]:
    """(file, size) of the request body, read BLOCK at a time into a temporary file (in memory
    up to SPOOL_IN_MEMORY, gone when closed); more than limit bytes is refused as they arrive."""
    with tempfile.SpooledTemporaryFile(max_size=SPOOL_IN_MEMORY) as spool:
        size = 0
        while chunk := read_body(min(BLOCK, limit + 1 - size)):
            size += len(chunk)
            prometheus.upload_bytes(len(chunk))
            if size > limit:
                raise UpdateTooLarge(f"update is larger than job {job!r}'s limit of {limit} bytes")
            spool.write(chunk)
        yield spool, size


def _same_as_stored(
    read: Callable[[int, str, IO[bytes]], bool], r: int, client: str, body: IO[bytes]
) -> bool | None:
    """Whether the client's stored update (read(r, client, out): round r's, or trained on
    version r) has body's bytes (None: there is none), compared as the store streams it:
    neither is ever whole in memory."""
    body.seek(0)
    same = _Comparison(body)
    if not read(r, client, same):  # type: ignore[arg-type]  # only writes
        return None
    return same.equal and body.read(1) == b""


class _Comparison:
    """A file-like sink that compares what is written to it with the next bytes of a file."""

    def __init__(self, file: IO[bytes]) -> None:
        self.file, self.equal = file, True

    def write(self, data: bytes) -> int:
        if self.equal:
            self.equal = self.file.read(len(data)) == data
        return len(data)


def _settle(rounds: Rounds, r: int, client: str) -> None:
    """Once the update is stored: answer 2xx only if round r's seal lists it or will. The
    sealer writes closing.json before it lists the updates, so without that marker any seal to
    come lists this update; with it, wait for the seal and look."""
    if not rounds.is_closing(r):
        return
    deadline = time.monotonic() + SEAL_WAIT
    while (seal := rounds.seal(r)) is None:
        if time.monotonic() > deadline:
            raise Unavailable(
                f"round {r} is being sealed; retry in a moment (the same bytes "
                "are safe to send again)"
            )
        time.sleep(0.05)
    if client not in seal.clients:
        rounds.delete_update(r, client)
        raise RoundNotOpen(
            f"round {r} was sealed while the update arrived; send it to round {r + 1}"
        )
