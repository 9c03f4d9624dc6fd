"""The finalize service: request the tree's nodes as their inputs appear, seal a round on quorum
or deadline, commit it from the top of its tree, and sweep for work whose events were lost.

Every request goes through a create-only marker (Rounds.request), so one publisher per node and
attempt: duplicated events make no duplicate work. No event handler lists anything; the seal and
the scheduled sweep list a round's keys once."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

from microfl import events, prometheus, shards, versions
from microfl.backends import Backends
from microfl.buffers import Buffers
from microfl.clientmetrics import MetricSums
from microfl.errors import BusUnavailable, JobNotFound, PoisonEvent
from microfl.exactsum import ExactSum
from microfl.faults import failpoint
from microfl.jobs import JobSpec, check_model, load_job, model_key
from microfl.models import carry_over, clip_notes, write_model
from microfl.privacy import DP, fold_weight
from microfl.rounds import Rounds, Seal, branch
from microfl.serde import (
    Event,
    PartialMeta,
    partial_from_safetensors,
    tensors_from_safetensors,
)

__all__ = ["RESEND_AFTER", "SWEEP_TRIGGER", "client_trigger", "commit", "handle", "seal", "sweep"]

LOG = logging.getLogger(__name__)
# Seconds before the sweep requests a node again; doubled at every further attempt, so a long
# queue of requests costs a few resends, not one per sweep.
RESEND_AFTER = 10.0
# Seal.trigger labels. Client ids never contain ':' (tokens.valid_id), so "client:<id>" and
# "internal:<what>" cannot collide, whatever a client is called (a client named "sweep" included).
SWEEP_TRIGGER = "internal:sweep"


def client_trigger(client: str) -> str:
    return f"client:{client}"


def handle(b: Backends, event: Event) -> None:
    if event.type == events.PING:
        sweep(b)
        return
    if event.type not in (events.UPDATE_ACCEPTED, events.PARTIAL_READY):
        raise PoisonEvent(f"finalize does not take events of type {event.type}")
    try:
        job, r = str(event.data["job"]), int(event.data["round"])
        if event.type == events.UPDATE_ACCEPTED:
            slot = event.data.get("slot")
            where = (None if slot is None else int(slot), 0)
        else:
            where = (int(event.data["level"]), int(event.data["node"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonEvent(f"event {event.id}: data needs job, round and its node ({exc})") from None
    try:
        spec = load_job(b.store, job)
    except JobNotFound as exc:
        raise PoisonEvent(str(exc)) from None
    if event.type == events.UPDATE_ACCEPTED:
        on_update(b, spec, r, str(event.data.get("client", "")), where[0])
    else:
        on_partial(b, spec, r, *where)  # type: ignore[arg-type]


def on_update(b: Backends, spec: JobSpec, r: int, client: str, slot: int | None) -> None:
    """An update holds `slot`: request its leaf once the leaf's last slot is taken (slots are a
    prefix, so that is one exists call), then seal the round if it is due."""
    rounds = Rounds(b.store, spec)
    if not 1 <= r <= spec.rounds:
        return
    if spec.is_async:  # an update.accepted of an async job always names its slot
        if slot is not None:
            _on_buffer_update(b, rounds, r, client_trigger(client), slot)
        return
    sealed = rounds.seal(r)
    if sealed is not None:
        # The seal's writer requested the rest, unless it died first: then the event that
        # sealed the round comes again (replays publish nothing, so only a redelivery can) and
        # requests what was never requested (create-only markers: nothing twice). The sweep
        # repairs the rest.
        if sealed.trigger == client_trigger(client):
            _advance(b, rounds, sealed, resend=False)
        return
    if not b.store.exists(model_key(spec.job, r - 1)):
        return
    k = spec.fan_in
    if slot is not None and not spec.sharded and rounds.slot_exists(r, (slot // k + 1) * k - 1):
        _request(b, rounds, r, [(0, slot // k)], resend=False)
    seal(b, spec, r, client_trigger(client), slot=slot)


def _on_buffer_update(b: Backends, rounds: Rounds, r: int, trigger: str, slot: int) -> None:
    """Async: request the leaf that `slot` completes (no need for model r-1: deltas fold on
    model 0's grid), and seal buffer r once its last slot is taken."""
    sealed = rounds.seal(r)
    if sealed is None:
        k, size = rounds.spec.fan_in, rounds.spec.buffer
        if rounds.slot_exists(r, min((slot // k + 1) * k, size) - 1):
            _request(b, rounds, r, [(0, slot // k)], resend=False)
        if not rounds.slot_exists(r, size - 1):
            return
        sealed, created = Buffers(b.store, rounds.spec).seal(r, b.clock(), trigger)
        failpoint("finalize.after_seal")
        if not created:
            return
    elif sealed.trigger != trigger:  # as in on_update: only the sealing event comes again
        return
    _advance(b, rounds, sealed, resend=False)


def on_partial(b: Backends, spec: JobSpec, r: int, level: int, j: int) -> None:
    """Node (level, j) exists: request its parent once all the parent's children exist, or
    commit when it is at the top of the sealed tree."""
    rounds = Rounds(b.store, spec)
    if rounds.has_record(r):
        return
    sealed = rounds.seal(r)
    if spec.sharded:  # shards exist only after the seal
        if sealed is not None:
            _advance(b, rounds, sealed, resend=False)
        return
    f = branch(spec.fan_in)
    siblings: Iterable[int] = range(j // f * f, (j // f + 1) * f)
    if sealed is not None:
        sizes = sealed.tree.sizes
        if level >= len(sizes) - 1:
            if level == len(sizes) - 1:
                commit(b, spec, r)
            return
        siblings = sealed.tree.children(level + 1, j // f)
    if all(rounds.node_exists(r, level, s) for s in siblings):
        _request(b, rounds, r, [(level + 1, j // f)], resend=False)


def seal(
    b: Backends, spec: JobSpec, r: int, trigger: str, slot: int | None = None, listing: bool = False
) -> Seal | None:
    """Seal round r if it is open and has quorum or is past its deadline (or a sealer decided
    and died), then request what the tree still lacks. Only the call that writes the seal
    requests; later calls leave a sealed round to the events and the sweep."""
    start = time.perf_counter()
    rounds = Rounds(b.store, spec)
    sealed = rounds.seal(r)
    if sealed is not None:
        return sealed
    reason = rounds.closing(r)
    if reason is None:
        if not rounds.is_open(r):
            return None
        reason = _seal_reason(b, rounds, r, slot, listing)
        if reason is None:
            return None
        # The decision first: uploads that land after it wait for the seal to see if they
        # made it, so no upload is told 202 and then left out.
        reason = rounds.create_closing(r, reason)
        failpoint("finalize.after_closing")
    clients = rounds.update_clients(r)  # after the marker: every update it lets in is here
    claimed = rounds.claimed_clients(r)  # after the updates: every claim listed has its slot...
    slots = rounds.slot_count(r)  # ...below this count
    tail = tuple(c for c in clients if c not in claimed)
    candidate = Seal(r, tuple(clients), spec.fan_in, reason, b.clock(), trigger, slots, tail)
    sealed, created = rounds.create_seal(candidate)
    failpoint("finalize.after_seal")
    if created:
        prometheus.since(prometheus.SEAL_SECONDS, start)
        _advance(b, rounds, sealed, resend=False)
    return sealed


def _seal_reason(
    b: Backends, rounds: Rounds, r: int, slot: int | None, listing: bool
) -> str | None:
    """Why round r should seal now ("quorum" or "deadline"), or None. Quorum is looked at only
    once slot Q-1 is taken (then one listing confirms it); the sweep lists anyway."""
    spec = rounds.spec
    q = spec.min_clients
    count: int | None = None
    if listing or (slot is not None and slot >= q - 1) or rounds.slot_exists(r, q - 1):
        count = len(rounds.update_clients(r))
        if count >= q:
            return "quorum"
    opened = rounds.opened_at(r)
    if opened is None or b.clock() < opened + spec.round_timeout:
        return None
    if slot is not None or (count if count is not None else len(rounds.update_clients(r))):
        return "deadline"
    return None


def _request(
    b: Backends, rounds: Rounds, r: int, nodes: Iterable[tuple[int, int]], resend: bool
) -> None:
    """Publish partial.requested for each node whose marker this call writes: attempt 0 if it
    was never requested; with resend, the next attempt once the last is old enough."""
    latest = rounds.requests(r) if resend else {}
    wanted, marked = [], []
    for level, j in nodes:
        attempt = 0
        if (level, j) in latest:
            attempt = latest[(level, j)]
            at = rounds.requested_at(r, level, j, attempt)
            if at is not None and b.clock() - at < RESEND_AFTER * 2**attempt:
                continue
            attempt += 1
        if rounds.request(r, level, j, attempt, b.clock()):
            failpoint("finalize.after_request")  # requested, unpublished: the sweep resends
            wanted.append(events.partial_requested(rounds.job, r, level, j, attempt))
            marked.append((level, j, attempt))
    if not wanted:
        return
    try:
        b.bus.publish(wanted, key=rounds.job)
    except BusUnavailable:
        # Take the markers back, so that the retry of this event requests the nodes again: a
        # marker left standing would make the retry publish nothing, and the nodes would wait
        # for the sweep's resend (a ping period; a cold producer's first publish can time out).
        for level, j, attempt in marked:
            rounds.unrequest(r, level, j, attempt)
        raise


def _advance(b: Backends, rounds: Rounds, sealed: Seal | None, resend: bool, r: int = 0) -> None:
    """Request every node that is missing and whose inputs exist (one listing of the nodes):
    the sealed tree's, or before the seal the nodes over full leaves; commit a complete tree."""
    if rounds.spec.sharded:  # nothing before the seal, then the shards (microfl.shards)
        if sealed is not None:
            wanted = shards.missing(rounds, sealed)
            if wanted is None:
                commit(b, rounds.spec, sealed.round, announce=resend)
            else:
                _request(b, rounds, sealed.round, wanted, resend)
        return
    k, f = rounds.spec.fan_in, branch(rounds.spec.fan_in)
    children: Callable[[int, int], Iterable[int]]
    if sealed is not None:
        r, tree = sealed.round, sealed.tree
        sizes = tree.sizes
        children = tree.children
        if not sizes:
            commit(b, rounds.spec, r, announce=resend)
            return
    else:
        sizes = [rounds.slot_count(r) // k]
        while sizes[-1] >= f:
            sizes.append(sizes[-1] // f)
        children = lambda level, j: range(j * f, (j + 1) * f)  # noqa: E731
    built = rounds.nodes(r)
    if sealed is not None and all((len(sizes) - 1, j) in built for j in range(sizes[-1])):
        commit(b, rounds.spec, r, announce=resend)
        return
    wanted = [
        (level, j)
        for level, n in enumerate(sizes)
        for j in range(n)
        if (level, j) not in built
        and (level == 0 or all((level - 1, c) in built for c in children(level, j)))
    ]
    _request(b, rounds, r, wanted, resend)


def commit(b: Backends, spec: JobSpec, r: int, announce: bool = False) -> bool:
    """Merge the top of sealed round r's tree (at most fan_in nodes) into model r, once; True
    when r is committed. round.committed is announced by the call that writes the record (or
    when asked)."""
    start = time.perf_counter()
    job = spec.job
    rounds = Rounds(b.store, spec)
    if spec.is_async:
        return _commit_versions(b, rounds, r, announce)
    sealed = rounds.seal(r)
    if sealed is None:
        return False
    if spec.sharded and not rounds.has_record(r):
        written = shards.commit(rounds, sealed, b.clock())
        if written is None:
            return False
        announce = written or announce
    elif not rounds.has_record(r):
        sizes = sealed.tree.sizes
        top = [(len(sizes) - 1, j) for j in range(sizes[-1])] if sizes else []
        if not all(rounds.node_exists(r, *node) for node in top):
            return False
        current = tensors_from_safetensors(check_model(spec, r - 1, _model(rounds, r - 1)))[0]
        total = ExactSum(current, max_weight=spec.max_examples)
        meta = PartialMeta()
        for node in top:  # one node in memory at a time besides the sum
            data = rounds.node(r, *node)
            if data is None:
                return False
            arrays, part = partial_from_safetensors(data)
            folded = sum(fold_weight(spec.strategy, n) for _, n in part.examples)
            total.merge(
                ExactSum.from_arrays(
                    current, arrays, len(part.examples), folded, max_weight=spec.max_examples
                )
            )
            meta += part
            failpoint("finalize.mid_combine")
        examples = dict(meta.examples)
        excluded = [{"client": c, "reason": why} for c, why in meta.excluded]
        late = sorted(set(rounds.update_clients(r)) - set(sealed.clients))
        excluded += [{"client": c, "reason": f"arrived after round {r} was sealed"} for c in late]
        weight = meta.weight  # the examples clients claimed; the sum's weight is total.weight
        metrics = meta.metrics
        if weight > 0 and not write_model(
            b.store, spec, r, current, total.finish(total.weight), meta, b.secret
        ):
            why = (
                f"the aggregate of round {r} is not finite (NaN or Inf after the "
                f"{spec.strategy} update); round {r} keeps model {r - 1}"
            )
            excluded += [{"client": c, "reason": why} for c in sorted(examples)]
            examples, weight, metrics = {}, 0, MetricSums()
        if weight == 0:  # nothing usable: the model and its optimiser state carry over
            carry_over(b.store, job, r, _model(rounds, r - 1))
        record: dict[str, Any] = {
            "job": job,
            "round": r,
            "state": "committed",
            "model_version": r,
            "included": sorted(examples),
            "examples": examples,
            "num_examples": weight,
            "excluded": sorted(excluded, key=lambda e: e["client"]),
            "sealed_reason": sealed.reason,
            "strategy": spec.strategy,
            "committed_at": b.clock(),
            **clip_notes(b.store, spec, r, meta),
        }
        if spec.strategy != DP:  # dp-fedavg: client metrics would leak unnoised (not summed)
            record["metrics"] = metrics.means()
        announce = rounds.create_record(r, record) or announce
        failpoint("finalize.after_record")
        prometheus.since(prometheus.COMMIT_SECONDS, start)
    if announce:
        b.bus.publish([events.round_committed(job, r)], key=job)
    return True


def _commit_versions(b: Backends, rounds: Rounds, r: int, announce: bool) -> bool:
    """Async: commit version r, then r + 1, ... while each is ready (versions.commit: sealed,
    tree complete, previous model written); True when version r is committed."""
    done = False
    while r <= rounds.spec.rounds:
        written = versions.commit(rounds, r, b.clock())
        if written is None:
            break
        failpoint("finalize.after_record")
        if written or announce:
            b.bus.publish([events.round_committed(rounds.job, r)], key=rounds.job)
        done, announce, r = True, False, r + 1
    return done


def _model(rounds: Rounds, version: int) -> bytes:
    data = rounds.model(version)
    if data is None:
        raise JobNotFound(f"job {rounds.job!r} has no model version {version}")
    return data


def sweep(b: Backends) -> None:
    """The scheduled pass, listing each job's open round once: seal rounds past their deadline
    (or whose sealer died), request nodes whose requests were lost (resent at growing
    intervals), commit rounds whose partial.ready or record was lost."""
    for job in b.store.children("jobs/"):
        try:
            spec = load_job(b.store, job)
            rounds = Rounds(b.store, spec)
            version = rounds.latest_version()
            if version >= 1 and not rounds.has_record(version):
                commit(b, spec, version, announce=True)  # record lost with its instance
            if spec.is_async:  # place unclaimed updates, close a late buffer, then as below
                found, work = Buffers(b.store, spec).sweep(version, b.clock(), SWEEP_TRIGGER)
                if found:
                    b.bus.publish(found, key=job)
                for buffer, sealed in work:
                    _advance(b, rounds, sealed, resend=True, r=buffer)
                continue
            r = rounds.open_round(version)
            if r is None:
                continue
            sealed = rounds.seal(r)
            if sealed is None:
                sealed = seal(b, spec, r, trigger=SWEEP_TRIGGER, listing=True)
            _advance(b, rounds, sealed, resend=True, r=r)
        except Exception as exc:  # one broken job must not stop the sweep of the others
            LOG.error("sweep: job %s: %s", job, exc, exc_info=exc, extra={"job": job})
