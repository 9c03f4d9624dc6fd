"""Asynchronous (FedBuff) jobs in storage: where their updates live, how an update takes a place
in a buffer, who each place counts for, and the staleness weight.

Buffer r (r >= 1) makes model version r as round r makes model r in a sync job: its slots, tree
nodes, requests, seal and record are round r's (microfl.rounds), so versions are folded by the
sync path's streaming exact-sum tree. What only async jobs have lives under `jobs/{job}/async/`:

    {base:08d}/updates/{client}    the client's update trained on version `base`; its update id
                                   is `{client}@{base}` ('@' never occurs in a client id)
    {base:08d}/claims/{client}     where that update counts: JSON {"buffer": r, "slot": n}

A buffer has exactly K = spec.buffer slots, each {"update": id} or {"void": why}, taken as a
prefix (a slot is created only right above a taken one). A new update takes the first free
slot of the first buffer that has one, from base + 1 up (buffers up to the latest version are
full), then writes its claim marker, create-only: the marker that stands names the one slot the
update counts in, and a slot whose update's marker names another (a concurrent retry claimed
first) is void. A leaf's builder writes a missing marker itself (the instance that took the slot
died before writing it), so whoever looks, a place's member never changes once decided.

Staleness: an update trained on version b that lands in buffer r has staleness
tau = (r - 1) - b >= 0, the versions committed between its base and the model version r is
applied to; it can exceed max_staleness only when buffers ahead were full when it arrived. Its
weight is w = (1 + tau) ** -a, a = spec.staleness_exponent (default 0.5: 1 / sqrt(1 + tau)).
Version r is the strategy's server update of model r-1 towards
model r-1 + sum_i n_i w_i (x_i - model b_i) / sum_i n_i (FedBuff, Nguyen et al. 2022, with
FedAvg's example weights); stale updates shrink the step rather than being renormalised.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import numpy as np

from microfl import events
from microfl.clientmetrics import MetricSums, client_metrics
from microfl.compress import HALF, Q8, Tensor, decode, delta
from microfl.errors import InvalidUpdate, MicroFLError, PoisonEvent, RoundNotOpen, StaleUpdate
from microfl.exactsum import ExactSum
from microfl.faults import failpoint
from microfl.jobs import JobSpec, check_model, model_key, validate_update
from microfl.privacy import clip_update
from microfl.rounds import Rounds, Seal, slot_key
from microfl.serde import (
    Event,
    PartialMeta,
    json_from_bytes,
    json_to_bytes,
    tensors_from_safetensors,
)
from microfl.store import ObjectStore

__all__ = [
    "Buffers",
    "Place",
    "base_version",
    "claim_key",
    "fold_deltas",
    "grid_base",
    "model_zero",
    "parse_update_id",
    "staleness_weight",
    "update_id",
    "update_key",
]

GROUP = 8  # updates folded together (exactsum.fold_many), as in aggregate
Work = tuple[int, Seal | None]  # a buffer with slots, and its seal if it has one
Tensors = Mapping[str, np.ndarray]


def update_id(client: str, base: int) -> str:
    return f"{client}@{base}"


def parse_update_id(uid: str) -> tuple[str, int]:
    client, _, base = uid.rpartition("@")
    return client, int(base)


def _base_dir(job: str, base: int) -> str:
    return f"jobs/{job}/async/{base:08d}"


def update_key(job: str, base: int, client: str) -> str:
    return f"{_base_dir(job, base)}/updates/{client}"


def claim_key(job: str, base: int, client: str) -> str:
    return f"{_base_dir(job, base)}/claims/{client}"


def staleness_weight(tau: int, exponent: float) -> float:
    """(1 + tau) ** -exponent; 1/sqrt for the default 0.5, correctly rounded everywhere."""
    if exponent == 0.5:
        return 1.0 / math.sqrt(1.0 + tau)
    return float((1.0 + tau) ** -exponent)


def base_version(metadata: Mapping[str, str]) -> int:
    """The version an async update trained on, from its __metadata__ (400 if absent)."""
    raw = metadata.get("base_version")
    if raw is None or not re.fullmatch(r"[0-9]{1,9}", raw):
        raise InvalidUpdate(
            "__metadata__.base_version must be the model version the update trained on, a "
            "non-negative integer as a string (GET /model's MicroFL-Model-Version header), "
            f"got {raw!r}"
        )
    return int(raw)


@dataclass(frozen=True)
class Place:
    """Slot `slot` of the buffer that makes version `buffer`."""

    buffer: int
    slot: int

    def to_bytes(self) -> bytes:
        return json_to_bytes({"buffer": self.buffer, "slot": self.slot})

    @classmethod
    def from_bytes(cls, data: bytes) -> Place:
        doc = json_from_bytes(data)
        return cls(int(doc["buffer"]), int(doc["slot"]))


class Buffers:
    """One async job's updates and buffers. The only in-process state is `_hint`, the buffer
    and slot after the last one this process took: where probing starts, never a decision."""

    _hint: dict[tuple[str, str], tuple[int, int]] = {}
    _hint_lock = threading.Lock()

    def __init__(self, store: ObjectStore, spec: JobSpec) -> None:
        self.store, self.spec, self.job = store, spec, spec.job
        self.rounds = Rounds(store, spec)
        self.k = spec.buffer

    # --- updates -------------------------------------------------------------------------------

    def check_fresh(self, base: int) -> None:
        """Refuse a new update whose base is unknown, too stale, or whose job is done: exists
        calls only (model base exists, model base + S + 1 does not), no listing."""
        spec, job = self.spec, self.job
        exists = self.store.exists
        if exists(model_key(job, spec.rounds)):
            raise RoundNotOpen(f"job {job!r} has made all its {spec.rounds} versions")
        stale = not exists(model_key(job, base)) or exists(
            model_key(job, base + spec.max_staleness + 1)
        )
        if stale:
            latest = self.rounds.latest_version()
            how = "newer than" if base > latest else f"more than {spec.max_staleness} behind"
            raise StaleUpdate(
                f"base_version {base} is {how} the latest version {latest} (max_staleness "
                f"{spec.max_staleness}); fetch version {latest} (GET /v1/jobs/{job}/model), "
                "train on it and send that update with base_version "
                f"{latest}"
            )

    def read_update(self, base: int, client: str) -> bytes | None:
        return self.store.read(update_key(self.job, base, client))

    def read_update_to_file(self, base: int, client: str, out: IO[bytes]) -> bool:
        return self.store.read_to_file(update_key(self.job, base, client), out)

    def create_update(self, base: int, client: str, body: IO[bytes]) -> bool:
        return self.store.create_from_file(update_key(self.job, base, client), body)

    def delete_update(self, base: int, client: str) -> None:
        self.store.delete(update_key(self.job, base, client))

    def unclaimed(self, bases: range) -> list[tuple[int, str]]:
        """(base, client) of every stored update without a claim marker (two listings a base)."""
        out = []
        for base in bases:
            prefix = _base_dir(self.job, base)
            stored = {k.rsplit("/", 1)[1] for k in self.store.list(f"{prefix}/updates/")}
            claimed = {k.rsplit("/", 1)[1] for k in self.store.list(f"{prefix}/claims/")}
            out += [(base, c) for c in sorted(stored - claimed)]
        return out

    # --- places ----------------------------------------------------------------------------------

    def claim(self, base: int, client: str) -> Place | None:
        data = self.store.read(claim_key(self.job, base, client))
        return None if data is None else Place.from_bytes(data)

    def create_claim(self, base: int, client: str, place: Place) -> Place:
        """Record where the update counts, once; the place that stands (a racer's, if first)."""
        if self.store.create(claim_key(self.job, base, client), place.to_bytes()):
            return place
        return self.claim(base, client) or place

    def place(self, base: int, client: str) -> tuple[Place | None, Place | None]:
        """Give the stored update a slot, then its claim: (the slot this call took, or None
        when every buffer up to the job's last is full; the place that stands, or None)."""
        taken = self._take_slot(update_id(client, base), base + 1)
        failpoint("buffers.after_slot")
        if taken is None:
            return None, self.claim(base, client)
        return taken, self.create_claim(base, client, taken)

    def _take_slot(self, uid: str, start: int) -> Place | None:
        """The first free slot of the first buffer >= start with one, created for uid."""
        hint_key = (self.store.url, self.job)
        r, low = self._hint.get(hint_key, (start, 0))
        if r < start or (r > start and not self.is_full(r - 1)):
            r, low = start, 0  # behind the start, or a hint from another life of this job name
        if low and not self.rounds.slot_exists(r, low - 1):
            low = 0
        while r <= self.spec.rounds:
            n = self._first_free(r, low)
            if n >= self.k:
                r, low = r + 1, 0
                continue
            if self.store.create(slot_key(self.job, r, n), json_to_bytes({"update": uid})):
                self._see(hint_key, (r, n + 1))
                return Place(r, n)
            low = n + 1
        return None

    @classmethod
    def _see(cls, hint_key: tuple[str, str], where: tuple[int, int]) -> None:
        with cls._hint_lock:
            if cls._hint.get(hint_key, (0, 0)) < where:
                if len(cls._hint) > 1024:
                    cls._hint.clear()
                cls._hint[hint_key] = where

    def is_full(self, r: int) -> bool:
        return r < 1 or self.rounds.slot_exists(r, self.k - 1)

    def _first_free(self, r: int, low: int) -> int:
        """The first free slot of buffer r at or above low (slots below low taken), K when it
        is full: the slots are a prefix, so one look at low, then bisection up to K - 1."""
        if not self.rounds.slot_exists(r, low):
            return low
        if self.is_full(r):
            return self.k
        low, high = low + 1, self.k - 1  # slot high is free
        while low < high:
            mid = (low + high) // 2
            if self.rounds.slot_exists(r, mid):
                low = mid + 1
            else:
                high = mid
        return low

    def slot(self, r: int, n: int) -> dict | None:
        data = self.store.read(slot_key(self.job, r, n))
        return None if data is None else json_from_bytes(data)

    def leaf_members(self, r: int, j: int) -> tuple[list[str], int]:
        """(the update ids leaf j of buffer r counts, in slot order; how many slots are void).
        A leaf is requested once its slots are all taken; each slot's member is decided by
        its update's claim marker, written here if missing."""
        fan_in = self.spec.fan_in
        members, void = [], 0
        for n in range(j * fan_in, min((j + 1) * fan_in, self.k)):
            doc = self.slot(r, n)
            if doc is None:
                raise PoisonEvent(
                    f"leaf {j} of buffer {r} has a free slot {n}; it is requested once full"
                )
            uid = doc.get("update")
            if uid is None:
                void += 1
                continue
            client, base = parse_update_id(str(uid))
            # read first: the marker almost always stands (a create would cost an fsync)
            place = self.claim(base, client) or self.create_claim(base, client, Place(r, n))
            if place == Place(r, n):
                members.append(str(uid))
            else:
                void += 1  # a retry of the same update claimed another slot first
        return members, void

    # --- closing and sealing -------------------------------------------------------------------

    def seal(self, r: int, now: float, trigger: str, deadline: bool = False) -> tuple[Seal, bool]:
        """Seal buffer r once its K slots are taken; with deadline, first take its free slots
        with void markers (create-only: a racing upload either got the slot, and is a member,
        or moves on to buffer r + 1). (The seal that stands or None, whether this call wrote
        it.) The seal's positions are the K slots: no listing."""
        sealed = self.rounds.seal(r)
        if sealed is not None:
            return sealed, False
        reason = "full"
        if deadline and not self.is_full(r):
            reason = "deadline"
            n = self._first_free(r, 0)
            while n < self.k:
                self.store.create(slot_key(self.job, r, n), json_to_bytes({"void": "deadline"}))
                n += 1
            failpoint("buffers.after_close")
        return self.rounds.create_seal(
            Seal(r, (), self.spec.fan_in, reason, now, trigger, slots=self.k)
        )

    def sweep(self, version: int, now: float, trigger: str) -> tuple[list[Event], list[Work]]:
        """The scheduled pass over an async job whose latest version is `version`: place the
        updates stored without a claim (their instance died first; the last max_staleness + 2
        bases are listed), seal full buffers and close buffer version + 1 past its deadline.
        (update.accepted for each update placed; (r, seal or None) of each buffer with slots,
        whose missing nodes finalize requests.)"""
        spec, found = self.spec, []
        for base, client in self.unclaimed(
            range(max(0, version - spec.max_staleness - 1), version + 1)
        ):
            taken, _ = self.place(base, client)
            if taken is not None:
                uid = update_id(client, base)
                found.append(events.update_accepted(self.job, taken.buffer, uid, taken.slot))
        work: list[Work] = []
        r = version + 1
        while r <= spec.rounds and self.rounds.slot_exists(r, 0):
            sealed = self.rounds.seal(r)
            if sealed is None and (self.is_full(r) or (r == version + 1 and self.due(r, now))):
                sealed = self.seal(r, now, trigger, deadline=True)[0]
            work.append((r, sealed))
            r += 1
        return found, work

    def due(self, r: int, now: float) -> bool:
        """Buffer r has an update and has not filled within round_timeout of version r-1's
        commit (job creation for r = 1)."""
        opened = self.rounds.opened_at(r)
        return (
            opened is not None
            and now >= opened + self.spec.round_timeout
            and self.rounds.slot_exists(r, 0)
        )


def grid_base(
    rounds: Rounds, zero: Mapping[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Model 0 in float64: the exact sum's grid for every buffer of an async job. Version r-1
    may not exist yet when buffer r's leaves fill, so the grid cannot be the sync path's model
    r-1; deltas are far inside model 0's range (exactsum: |y| < 2**(58 - wbits) times its
    scale, 2**38 at the default max_examples), and the rounding, g/2 = 2**-41 of model 0's
    largest value, stays within 1e-6 of the model while it does not shrink 2**21-fold.
    `zero`: model 0's tensors when the caller has read them already."""
    tensors = model_zero(rounds) if zero is None else zero
    return {name: arr.astype(np.float64) for name, arr in tensors.items()}


def model_zero(rounds: Rounds) -> dict[str, np.ndarray]:
    data = rounds.model(0)
    if data is None:
        raise PoisonEvent(f"job {rounds.job!r} has no model version 0")
    return tensors_from_safetensors(check_model(rounds.spec, 0, data))[0]


def fold_deltas(
    acc: ExactSum,
    spec: JobSpec,
    r: int,
    members: Sequence[tuple[str, bytes | None]],
    model: Callable[[int], Mapping[str, np.ndarray] | None],
    clip: float | None = None,
) -> PartialMeta:
    """Buffer r's leaf step, pure but for `model(v)` (version v's tensors, None if missing):
    fold y = w(tau) * (x - model[base]) in float64 with integer weight num_examples, GROUP at a
    time; with a clip bound each delta from ITS base is clipped first. Each y is a function of
    its update, base and tau alone, so the sum stays order-independent. Base models are looked
    up through `model`, which the caller caches (at most fan_in distinct per leaf)."""
    examples: list[tuple[str, int]] = []
    excluded: list[tuple[str, str]] = []
    unclipped = 0
    metrics = MetricSums()
    for start in range(0, len(members), GROUP):
        loaded: list[tuple[str, Mapping[str, Tensor], Tensors, float, int, bool]] = []
        reported: list[MetricSums] = []
        for uid, data in members[start : start + GROUP]:
            base_v = parse_update_id(uid)[1]
            base = model(base_v)
            if data is None or base is None:
                what = "update object" if data is None else f"base version {base_v}"
                excluded.append((uid, f"{what} is missing from storage"))
                continue
            try:
                tensors, metadata = tensors_from_safetensors(data)
                n = validate_update(spec, tensors, metadata, values=False)
                reported.append(MetricSums.of(client_metrics(metadata), n))
            except MicroFLError as exc:
                excluded.append((uid, f"stored update is invalid: {exc}"))
                continue
            within = False
            update: Mapping[str, Tensor] = decode(tensors, base)  # int8: deltas from base
            if clip is not None:
                update, within = clip_update(update, base, clip)
            w = staleness_weight(r - 1 - base_v, spec.staleness_exponent)
            if any(isinstance(x, Q8) or x.dtype in HALF for x in update.values()):
                # compressed: the delta made here; folded as (y - 0) * 1, the same bits
                with np.errstate(all="ignore"):  # a non-finite delta is refused by the fold
                    update = {k: delta(x, base[k]) * w for k, x in update.items()}
                base, w = _zeros(base), 1.0
            loaded.append((uid, update, base, w, n, within))
        refused = dict(
            acc.fold_many(
                [x for _, x, _, _, _, _ in loaded],
                [n for _, _, _, _, n, _ in loaded],
                bases=[b for _, _, b, _, _, _ in loaded],
                scales=[w for _, _, _, w, _, _ in loaded],
            )
        )
        for i, (uid, _, _, _, n, within) in enumerate(loaded):
            if i in refused:
                excluded.append((uid, f"stored update is invalid: {refused[i]}"))
            else:
                examples.append((uid, n))
                unclipped += within
                metrics += reported[i]
        failpoint("aggregate.mid_fold")
    return PartialMeta(tuple(examples), tuple(excluded), unclipped, metrics)


def _zeros(like: Mapping[str, np.ndarray]) -> Tensors:
    return {k: np.zeros(v.shape) for k, v in like.items()}
