"""Writing model r once its round (or buffer) is aggregated: the strategy's server update (or
dp-fedavg's keyed release), the NaN/Inf guard, the server state written before the model, and
carrying a model over a round without a usable update. Shared by rounds (finalize) and
asynchronous versions (versions)."""

from __future__ import annotations

from typing import Any

import numpy as np

from microfl.faults import failpoint
from microfl.jobs import JobSpec, model_key, optimizer_key
from microfl.privacy import DP, DpState, noise_key, privacy_record, release
from microfl.serde import PartialMeta, tensors_from_safetensors, tensors_to_safetensors
from microfl.store import ObjectStore
from microfl.strategy import make_strategy

__all__ = ["carry_over", "clip_notes", "server_state", "write_model"]

Tensors = dict[str, np.ndarray]


def server_state(store: ObjectStore, job: str, version: int) -> Tensors | None:
    """The server state stored beside model `version` (FedAdam's moments, DpState), if any."""
    saved = store.read(optimizer_key(job, version))
    return tensors_from_safetensors(saved)[0] if saved else None


def write_model(
    store: ObjectStore,
    spec: JobSpec,
    r: int,
    current: Tensors,
    mean: Tensors,
    meta: PartialMeta | None = None,
    secret: bytes = b"",
) -> bool:
    """Write model r (and its server state, first) from the mean of round r's updates; False,
    writing nothing, when the mean, the next model or its state holds NaN or Inf (invariant 8:
    never commit one). Deterministic, so every retry decides alike: dp-fedavg's noise is keyed
    by the secret (and needs `meta`: the count and how many were within the clip)."""
    job = spec.job
    state = server_state(store, job, r - 1) if spec.strategy != "fedavg" and r > 1 else None
    strategy = make_strategy(spec.strategy, spec.strategy_options)
    new_state: Tensors | None
    with np.errstate(all="ignore"):  # overflow is judged below, not warned about
        if spec.strategy == DP:  # the noised mean, then FedAvg's update; the state is DpState
            if meta is None:
                raise ValueError("dp-fedavg's release needs the round's PartialMeta")
            before = DpState.from_tensors(spec.options, state)
            after = release(
                mean,
                current,
                len(meta.examples),
                meta.unclipped,
                before,
                spec.options,
                spec.min_clients,
                noise_key(secret),
                job,
                r,
            )
            model, new_state = strategy.server_update(current, mean, None)[0], after.to_tensors()
        else:
            model, new_state = strategy.server_update(current, mean, state)
    if not all(_finite(t) for t in (mean, model, new_state or {})):
        return False
    if new_state is not None:  # state first: model r existing implies its state exists
        store.create(optimizer_key(job, r), tensors_to_safetensors(new_state))
    store.create(model_key(job, r), tensors_to_safetensors(model))
    failpoint("finalize.after_model")
    return True


def carry_over(store: ObjectStore, job: str, r: int, previous: bytes) -> None:
    """Model r is model r-1 (`previous`), and the server state after r-1 (FedAdam's moments,
    DpState) becomes the state after r, so a round without a usable update resets nothing.
    State first, as in write_model: model r existing implies its state exists."""
    state = store.read(optimizer_key(job, r - 1))
    if state is not None:
        store.create(optimizer_key(job, r), state)
    store.create(model_key(job, r), previous)


def clip_notes(store: ObjectStore, spec: JobSpec, r: int, meta: PartialMeta) -> dict[str, Any]:
    """The record's `privacy` (dp-fedavg: from the states beside models r-1 and r, so a retry
    writes the same) or `clip` (how many of the folded updates were clipped; under dp-fedavg
    that count is private and not shown)."""
    options = spec.options
    if spec.strategy == DP:
        before = DpState.from_tensors(
            options, server_state(store, spec.job, r - 1) if r > 1 else None
        )
        after = DpState.from_tensors(options, server_state(store, spec.job, r))
        return {"privacy": privacy_record(options, spec.min_clients, before, after)}
    if "clip" in options:
        clipped = len(meta.examples) - meta.unclipped
        return {"clip": {"bound": options["clip"], "clipped": clipped}}
    return {}


def _finite(tensors: Tensors) -> bool:
    return all(np.isfinite(a).all() for a in tensors.values() if a.dtype.kind == "f")
