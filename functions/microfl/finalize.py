"""The finalize service: seal a round on quorum or deadline, commit it once all partials exist,
and sweep for work whose events were lost (the scheduled ping)."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from microfl import events
from microfl.backends import Backends
from microfl.errors import JobNotFound, PoisonEvent
from microfl.faults import failpoint
from microfl.jobs import (
    JobSpec,
    Seal,
    check_model,
    closing_key,
    latest_version,
    load_job,
    model_key,
    open_round,
    optimizer_key,
    partial_key,
    partials_prefix,
    record_key,
    round_opened_at,
    seal_key,
    updates_prefix,
)
from microfl.serde import (
    Event,
    json_from_bytes,
    json_to_bytes,
    tensors_from_safetensors,
    tensors_to_safetensors,
)
from microfl.strategy import make_strategy, mean_of, merge

__all__ = ["SWEEP_TRIGGER", "client_trigger", "commit", "handle", "seal", "sweep"]

LOG = logging.getLogger(__name__)
RESEND_AFTER = 10.0  # seconds a sealed round may wait for a partial before it is requested again
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
    except (KeyError, TypeError, ValueError) as exc:
        raise PoisonEvent(f"event {event.id}: data needs job and round ({exc})") from None
    try:
        spec = load_job(b.store, job)
    except JobNotFound as exc:
        raise PoisonEvent(str(exc)) from None
    if event.type == events.UPDATE_ACCEPTED:
        seal(b, spec, r, trigger=client_trigger(str(event.data.get("client", ""))))
    else:
        commit(b, spec, r)


def seal(
    b: Backends, spec: JobSpec, r: int, trigger: str, resend_after: float | None = None
) -> Seal | None:
    """Seal round r if it is open and has quorum or is past its deadline, and request its
    partials. The call that creates the seal requests them once; partials still missing (that
    instance may have died before publishing) are requested again only by the sweep,
    resend_after seconds after the seal. Every other event, a redelivery of the very event that
    sealed the round included, leaves a sealed round alone, so no event multiplies the work."""
    job = spec.job
    existing = b.store.read(seal_key(job, r))
    created = False
    if existing is None:
        if open_round(spec, latest_version(b.store, job)) != r:
            return None
        closing = b.store.read(closing_key(job, r))
        if closing is None:
            reason = _seal_reason(b, spec, r)
            if reason is None:
                return None
            # The decision first: uploads that land after it wait for the seal to see if they
            # made it, so no upload is told 202 and then left out.
            b.store.create(closing_key(job, r), json_to_bytes({"reason": reason}))
            failpoint("finalize.after_closing")
            closing = b.store.read(closing_key(job, r)) or json_to_bytes({"reason": reason})
        clients = [k.rsplit("/", 1)[1] for k in b.store.list(updates_prefix(job, r))]
        reason = json_from_bytes(closing)["reason"]
        candidate = Seal(r, tuple(sorted(clients)), spec.fan_in, reason, b.clock(), trigger)
        existing = candidate.to_bytes()
        created = b.store.create(seal_key(job, r), existing)
        failpoint("finalize.after_seal")
        if not created:
            existing = b.store.read(seal_key(job, r)) or existing
    sealed = Seal.from_bytes(existing)
    if b.store.exists(record_key(job, r)):
        return sealed
    swept = resend_after is not None and b.clock() - sealed.sealed_at >= resend_after
    if not (created or swept):
        return sealed
    done = set(b.store.list(partials_prefix(job, r)))
    wanted = [
        events.partial_requested(job, r, c)
        for c in range(sealed.chunks)
        if partial_key(job, r, c) not in done
    ]
    if wanted:
        b.bus.publish(wanted, key=job)
    elif swept:
        commit(b, spec, r, announce=True)
    return sealed


def _seal_reason(b: Backends, spec: JobSpec, r: int) -> str | None:
    """Why round r should seal now ("quorum" or "deadline"), or None."""
    count = len(b.store.list(updates_prefix(spec.job, r)))
    if count >= spec.min_clients:
        return "quorum"
    opened = round_opened_at(b.store, spec, r)
    if count and opened is not None and b.clock() >= opened + spec.round_timeout:
        return "deadline"
    return None


def commit(b: Backends, spec: JobSpec, r: int, announce: bool = False) -> bool:
    """Combine the partials of sealed round r into model r, once; True when r is committed.
    round.committed is announced by the call that writes the record (or when asked)."""
    job = spec.job
    sealed = b.store.read(seal_key(job, r))
    if sealed is None:
        return False
    seal_doc = Seal.from_bytes(sealed)
    keys = [partial_key(job, r, c) for c in range(seal_doc.chunks)]
    present = set(b.store.list(partials_prefix(job, r)))
    if not all(k in present for k in keys):
        return False
    if not b.store.exists(record_key(job, r)):
        total = None
        weight = 0
        examples: dict[str, int] = {}
        excluded: list[dict[str, str]] = []
        for key in keys:  # one partial in memory at a time, in chunk order (deterministic)
            data = b.store.read(key)
            if data is None:
                return False
            tensors, meta = tensors_from_safetensors(data)
            with np.errstate(over="ignore"):  # an overflow is caught in _write_model
                total = merge(total, tensors)
            failpoint("finalize.mid_combine")
            weight += int(meta["num_examples"])
            examples.update(dict(json_from_bytes(meta["examples"].encode())))
            excluded += [
                {"client": c, "reason": why}
                for c, why in json_from_bytes(meta["excluded"].encode())
            ]
        late = sorted(
            {k.rsplit("/", 1)[1] for k in b.store.list(updates_prefix(job, r))}
            - set(seal_doc.clients)
        )
        excluded += [{"client": c, "reason": f"arrived after round {r} was sealed"} for c in late]
        if weight > 0 and total is not None and not _write_model(b, spec, r, total, weight):
            why = (
                f"the aggregate of round {r} is not finite (NaN or Inf after the "
                f"{spec.strategy} update); round {r} keeps model {r - 1}"
            )
            excluded += [{"client": c, "reason": why} for c in sorted(examples)]
            examples, weight = {}, 0
        if weight == 0:  # nothing usable: the model and its optimiser state carry over
            _carry_over(b, spec, r)
        record: dict[str, Any] = {
            "job": job,
            "round": r,
            "state": "committed",
            "model_version": r,
            "included": sorted(examples),
            "examples": examples,
            "num_examples": weight,
            "excluded": sorted(excluded, key=lambda e: e["client"]),
            "sealed_reason": seal_doc.reason,
            "strategy": spec.strategy,
            "committed_at": b.clock(),
        }
        announce = b.store.create(record_key(job, r), json_to_bytes(record)) or announce
        failpoint("finalize.after_record")
    if announce:
        b.bus.publish([events.round_committed(job, r)], key=job)
    return True


def _write_model(b: Backends, spec: JobSpec, r: int, total: dict, weight: int) -> bool:
    """Write model r (and its optimiser state) from the round's sum; False, writing nothing,
    when the mean, the next model or its state holds NaN or Inf (invariant 8: never commit
    one). Deterministic, so every retry decides alike."""
    job = spec.job
    current_bytes = b.store.read(model_key(job, r - 1))
    if current_bytes is None:
        raise JobNotFound(f"job {job!r} has no model version {r - 1}")
    current, _ = tensors_from_safetensors(check_model(spec, r - 1, current_bytes))
    state = None
    if spec.strategy != "fedavg" and r > 1:
        saved = b.store.read(optimizer_key(job, r - 1))
        state = tensors_from_safetensors(saved)[0] if saved else None
    strategy = make_strategy(spec.strategy, spec.strategy_options)
    with np.errstate(all="ignore"):  # overflow is judged below, not warned about
        mean = mean_of(total, weight)
        model, new_state = strategy.server_update(current, mean, state)
    if not all(_finite(t) for t in (mean, model, new_state or {})):
        return False
    if new_state is not None:  # state first: model r existing implies its state exists
        b.store.create(optimizer_key(job, r), tensors_to_safetensors(new_state))
    b.store.create(model_key(job, r), tensors_to_safetensors(model))
    failpoint("finalize.after_model")
    return True


def _finite(tensors: dict) -> bool:
    return all(np.isfinite(a).all() for a in tensors.values() if a.dtype.kind == "f")


def _carry_over(b: Backends, spec: JobSpec, r: int) -> None:
    """Model r is model r-1, and the optimiser state after r-1 (FedAdam's moments) becomes the
    state after r, so a round without a usable update resets nothing. State first, as in
    _write_model: model r existing implies its state exists."""
    job = spec.job
    state = b.store.read(optimizer_key(job, r - 1))
    if state is not None:
        b.store.create(optimizer_key(job, r), state)
    previous = b.store.read(model_key(job, r - 1))
    if previous is None:
        raise JobNotFound(f"job {job!r} has no model version {r - 1}")
    b.store.create(model_key(job, r), previous)


def sweep(b: Backends) -> None:
    """The scheduled pass: seal rounds past their deadline, re-request lost partials, commit
    rounds whose partial.ready events were lost."""
    for job in b.store.children("jobs/"):
        try:
            spec = load_job(b.store, job)
            version = latest_version(b.store, job)
            if version >= 1 and not b.store.exists(record_key(job, version)):
                commit(b, spec, version, announce=True)  # record lost with its instance
            r = open_round(spec, version)
            if r is not None:
                seal(b, spec, r, trigger=SWEEP_TRIGGER, resend_after=RESEND_AFTER)
        except Exception as exc:  # one broken job must not stop the sweep of the others
            LOG.error("sweep: job %s: %s", job, exc, exc_info=exc, extra={"job": job})
