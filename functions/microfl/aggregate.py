"""The aggregate service: one node of a round's aggregation tree, written once, create-only.

A leaf (level 0) folds the updates of fan_in tree positions into an exact sum (exactsum), while
the round is still filling or after its seal; an inner node merges at most fan_in nodes of the
level below. Memory holds the accumulator and at most fan_in updates (or nodes), whatever the
round's size, and no invocation reads more than fan_in objects besides the base model."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import numpy as np

from microfl import buffers, events, prometheus, shards
from microfl.backends import Backends
from microfl.clientmetrics import MetricSums, client_metrics
from microfl.compress import Tensor, decode
from microfl.errors import JobNotFound, MicroFLError, PoisonEvent, Unavailable
from microfl.exactsum import ExactSum
from microfl.faults import failpoint
from microfl.jobs import JobSpec, check_model, load_job, optimizer_key, validate_update
from microfl.privacy import DP, clip_update, fold_weight, round_clip
from microfl.rounds import Rounds, Seal, branch
from microfl.serde import (
    Event,
    PartialMeta,
    partial_from_safetensors,
    partial_to_safetensors,
    tensors_from_safetensors,
)

__all__ = ["build_node", "fold_updates", "handle", "warm"]

SEAL_WAIT = 10.0  # seconds a leaf's builder waits for a seal in progress before answering 503
GROUP = 8  # updates folded together, block by block (exactsum.fold_many)


def warm() -> None:
    """Load the fold loops of float32 updates, plain (sync leaves) and as deltas (async
    leaves), before the instance takes events: numba loads each from its cache on first use
    (~0.7 s apiece), which would otherwise sit between a round's last upload and its commit on
    the very instance min-scale keeps warm for that."""
    one = {"w": np.zeros(1, np.float32)}
    ExactSum(one).fold_many([one], [1])
    ExactSum({"w": np.zeros(1)}).fold_many([one], [1], bases=[one], scales=[1.0])


def handle(b: Backends, event: Event) -> None:
    if event.type != events.PARTIAL_REQUESTED:
        raise PoisonEvent(f"aggregate takes {events.PARTIAL_REQUESTED}, not {event.type}")
    try:
        job, r = str(event.data["job"]), int(event.data["round"])
        level, node = int(event.data["level"]), int(event.data["node"])
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonEvent(
            f"event {event.id}: data needs job, round, level and node ({exc})"
        ) from None
    try:
        spec = load_job(b.store, job)
    except JobNotFound as exc:
        raise PoisonEvent(str(exc)) from None
    if spec.sharded:  # a robust round: a coordinate shard, not a node of the summing tree
        shards.build_shard(b.store, spec, r, level, node)
        b.bus.publish([events.partial_ready(spec.job, r, level, node)], key=spec.job)
        return
    build_node(b, spec, r, level, node)


def build_node(b: Backends, spec: JobSpec, r: int, level: int, j: int) -> None:
    """Write node (level, j) of round r unless it exists, then announce it."""
    rounds = Rounds(b.store, spec)
    if level < 0 or j < 0:
        raise PoisonEvent(f"round {r} has no node {j} at level {level}")
    if not rounds.node_exists(r, level, j):
        start = time.perf_counter()
        # an async job's buffers sum deltas on model 0's grid (buffers.grid_base)
        zero = buffers.model_zero(rounds) if spec.is_async else None
        base = buffers.grid_base(rounds, zero) if zero is not None else _base(rounds, spec, r)
        acc = ExactSum(base, max_weight=spec.max_examples)
        if level == 0 and zero is not None:
            meta = _fold_buffer_leaf(b, spec, acc, r, j, zero)
        elif level == 0:
            members = _read_members(rounds, r, _leaf_members(rounds, r, j))
            meta = fold_updates(acc, spec, members, base, _clip_bound(b, spec, r))
        else:
            meta = _merge_children(rounds, acc, base, r, level, j)
        rounds.create_node(r, level, j, partial_to_safetensors(acc.to_arrays(), meta))
        prometheus.node_built(level, base, meta.examples, start)
        failpoint("aggregate.after_partial")
    b.bus.publish([events.partial_ready(spec.job, r, level, j)], key=spec.job)


def fold_updates(
    acc: ExactSum,
    spec: JobSpec,
    members: Sequence[tuple[str, bytes | None]],
    base: Mapping[str, np.ndarray] | None = None,
    clip: float | None = None,
) -> PartialMeta:
    """The partial-sum step, pure: (client, stored bytes or None) in position order folded into
    acc, GROUP at a time; what went in and what was left out, and why. With a clip bound each
    update's delta from the base is clipped first (privacy.clip_update: a function of the
    update and the base alone, so the sum stays order-independent). The metrics of the updates
    folded are summed exactly (clientmetrics), except under dp-fedavg, whose record must not
    carry unnoised client information."""
    if clip is not None and base is None:
        raise ValueError("clipping needs the round's base model")
    examples: list[tuple[str, int]] = []
    excluded: list[tuple[str, str]] = []
    unclipped = 0
    metrics = MetricSums()
    for start in range(0, len(members), GROUP):
        loaded: list[tuple[str, Mapping[str, Tensor], int]] = []
        reported: list[MetricSums] = []
        for client, data in members[start : start + GROUP]:
            if data is None:
                excluded.append((client, "update object is missing from storage"))
                continue
            try:
                tensors, metadata = tensors_from_safetensors(data)
                n = validate_update(spec, tensors, metadata, values=False)
                reported.append(MetricSums.of(_metrics(spec, metadata), n))
            except MicroFLError as exc:
                excluded.append((client, f"stored update is invalid: {exc}"))
                continue
            loaded.append((client, decode(tensors, base), n))  # int8 deltas: from the base
        within = [False] * len(loaded)
        if clip is not None and base is not None:
            for i, (client, update, n) in enumerate(loaded):
                clipped, within[i] = clip_update(update, base, clip, spec.strategy == DP)
                loaded[i] = (client, clipped, n)
        weights = [fold_weight(spec.strategy, n) for _, _, n in loaded]
        refused = dict(acc.fold_many([t for _, t, _ in loaded], weights))
        for i, (client, _, n) in enumerate(loaded):
            if i in refused:
                excluded.append((client, f"stored update is invalid: {refused[i]}"))
            else:
                examples.append((client, n))
                unclipped += within[i]
                metrics += reported[i]
        failpoint("aggregate.mid_fold")
    return PartialMeta(tuple(examples), tuple(excluded), unclipped, metrics)


def _metrics(spec: JobSpec, metadata: Mapping[str, str]) -> dict[str, float]:
    """What an update's metrics add to the round: nothing under dp-fedavg (unnoised)."""
    return {} if spec.strategy == DP else client_metrics(metadata)


def _clip_bound(b: Backends, spec: JobSpec, r: int) -> float | None:
    """Round r's clip bound (None: the strategy does not clip): the `clip` option, or under
    adaptive clipping the bound finalize stored beside model r-1, before writing it."""
    options = spec.options
    saved = b.store.read(optimizer_key(spec.job, r - 1)) if spec.strategy == DP else None
    return round_clip(options, tensors_from_safetensors(saved)[0] if saved else None)


def _fold_buffer_leaf(
    b: Backends, spec: JobSpec, acc: ExactSum, r: int, j: int, zero: dict[str, np.ndarray]
) -> PartialMeta:
    """Leaf j of an async job's buffer r: its members' deltas from their own base versions,
    each base read once (at most fan_in of them besides fan_in updates; model 0, `zero`, was
    read for the grid)."""
    buf = buffers.Buffers(b.store, spec)
    uids, _ = buf.leaf_members(r, j)
    members = []
    for uid in uids:
        client, base = buffers.parse_update_id(uid)
        members.append((uid, buf.read_update(base, client)))
    models: dict[int, dict[str, np.ndarray] | None] = {0: zero}

    def model(v: int) -> dict[str, np.ndarray] | None:
        if v not in models:
            data = buf.rounds.model(v)
            checked = None if data is None else check_model(spec, v, data)
            models[v] = None if checked is None else tensors_from_safetensors(checked)[0]
        return models[v]

    return buffers.fold_deltas(acc, spec, r, members, model, spec.options.get("clip"))


def _base(rounds: Rounds, spec: JobSpec, r: int) -> dict[str, np.ndarray]:
    """Model r-1: its tensors fix the exact sum's grid, the same in every function."""
    data = rounds.model(r - 1)
    if data is None:
        raise PoisonEvent(f"job {spec.job!r} has no model version {r - 1}; round {r} never opened")
    return tensors_from_safetensors(check_model(spec, r - 1, data))[0]


def _leaf_members(rounds: Rounds, r: int, j: int) -> list[str]:
    """The clients leaf j counts, in position order. Before the seal: read the K slots, THEN
    look for the closing marker; if there is none, every slot (and so its update) was written
    before the sealer's listing, which therefore includes them all. Otherwise the seal decides."""
    k = rounds.spec.fan_in
    seal = rounds.seal(r)
    slots: dict[int, str | None] = {}
    if seal is None:
        slots = {p: rounds.slot_client(r, p) for p in range(j * k, (j + 1) * k)}
        free = [p for p, c in slots.items() if c is None]
        if free:
            raise PoisonEvent(
                f"leaf {j} of round {r} has free slots {free}; it is requested once full or sealed"
            )
        for p, client in slots.items():  # the seal lists these claims: none goes to its tail
            rounds.note_claim(r, str(client), p)
        if not rounds.is_closing(r):
            return [str(c) for c in slots.values()]
        seal = _wait_for_seal(rounds, r)
    tree = seal.tree
    if not tree.sizes or j >= tree.sizes[0]:
        raise PoisonEvent(f"round {r} was sealed with {tree.sizes[:1] or [0]} leaves, not {j + 1}")
    members = []
    for p in tree.positions_of(j):
        on_slot = (slots[p] if p in slots else rounds.slot_client(r, p)) if p < seal.slots else None
        client = seal.member(p, on_slot)
        if client is not None:
            members.append(client)
    return members


def _wait_for_seal(rounds: Rounds, r: int) -> Seal:
    deadline = time.monotonic() + SEAL_WAIT
    while (seal := rounds.seal(r)) is None:
        if time.monotonic() > deadline:
            raise Unavailable(f"round {r} is being sealed; its leaves wait for the seal")
        time.sleep(0.05)
    return seal


def _read_members(rounds: Rounds, r: int, clients: list[str]) -> list[tuple[str, bytes | None]]:
    return [(c, rounds.read_update(r, c)) for c in clients]


def _merge_children(
    rounds: Rounds, acc: ExactSum, base: Mapping[str, np.ndarray], r: int, level: int, j: int
) -> PartialMeta:
    """Node (level, j) from its children, which finalize saw written before requesting it:
    all `branch` of them before the seal, the sealed tree's (fewer at its right edge) after."""
    seal = rounds.seal(r)
    f = branch(rounds.spec.fan_in)
    children = range(j * f, (j + 1) * f)
    if seal is not None:
        sizes = seal.tree.sizes
        if level < len(sizes) and j < sizes[level]:
            children = seal.tree.children(level, j)
    meta = PartialMeta()
    for c in children:
        data = rounds.node(r, level - 1, c)
        if data is None:
            raise PoisonEvent(
                f"node {c} of level {level - 1} of round {r} is missing; node {j} of level "
                f"{level} is requested again once it exists"
            )
        arrays, part = partial_from_safetensors(data)
        weight = sum(fold_weight(rounds.spec.strategy, n) for _, n in part.examples)
        acc.merge_arrays(arrays, len(part.examples), weight)
        meta += part
    return meta
