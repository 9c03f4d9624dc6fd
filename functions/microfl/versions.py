"""The commit of an async job's version r: the top of buffer r's exact-sum tree applied to model
r-1 through the strategy, then version r's record, both create-only (layout and weights in
microfl.buffers).

Commits are sequential: version r needs model r-1, so finalize tries version r + 1 after it
writes record r, and the sweep tries them too. The model depends only on the buffer's members,
their bases and model r-1, so every retry writes the same bytes."""

from __future__ import annotations

from typing import Any

import numpy as np

from microfl.buffers import grid_base, parse_update_id, staleness_weight
from microfl.exactsum import ExactSum
from microfl.faults import failpoint
from microfl.jobs import check_model
from microfl.models import carry_over, write_model
from microfl.rounds import Rounds, Seal
from microfl.serde import (
    PartialMeta,
    partial_from_safetensors,
    tensors_from_safetensors,
)

__all__ = ["commit"]


def commit(rounds: Rounds, r: int, now: float) -> bool | None:
    """Write model r and record r unless record r exists. None while buffer r is not sealed,
    the top of its tree is incomplete or version r-1 is not committed (its record written:
    otherwise a crash between model r-1 and its record could leave the record to a sweep that
    only looks at the latest version); else whether this call wrote the record."""
    spec = rounds.spec
    if rounds.has_record(r):
        return False
    sealed = rounds.seal(r)
    previous = rounds.model(r - 1)
    if sealed is None or previous is None or (r > 1 and not rounds.has_record(r - 1)):
        return None
    sizes = sealed.tree.sizes
    top = [(len(sizes) - 1, j) for j in range(sizes[-1])]
    if not all(rounds.node_exists(r, *node) for node in top):
        return None
    grid = grid_base(rounds)
    total = ExactSum(grid, max_weight=spec.max_examples)
    meta = PartialMeta()
    for node in top:  # one node in memory at a time besides the sum
        data = rounds.node(r, *node)
        if data is None:
            return None
        arrays, part = partial_from_safetensors(data)
        total.merge_arrays(arrays, len(part.examples), part.weight)
        meta += part
        failpoint("finalize.mid_combine")
    current = tensors_from_safetensors(check_model(spec, r - 1, previous))[0]
    excluded = list(meta.excluded)
    examples = dict(meta.examples)
    delta = total.finish(total.weight) if examples else {}
    mean = {k: current[k].astype(np.float64) + d for k, d in delta.items()}
    if examples and not write_model(rounds.store, spec, r, current, mean):
        why = f"the aggregate of version {r} is not finite; version {r} keeps model {r - 1}"
        excluded += [(uid, why) for uid in sorted(examples)]
        examples = {}
    if not examples:  # nothing usable: the model and its optimiser state carry over
        carry_over(rounds.store, rounds.job, r, previous)
    return rounds.create_record(r, _record(rounds, sealed, examples, excluded, meta, now))


def _record(
    rounds: Rounds,
    sealed: Seal,
    examples: dict[str, int],
    excluded: list[tuple[str, str]],
    meta: PartialMeta,
    now: float,
) -> dict[str, Any]:
    """Version r's record: `included` are update ids (`client@base`: a client may have two
    updates in one buffer, trained on different versions); `examples` and `weights` (each
    update's share n_i w_i / sum n) are for admins only (ingest strips them)."""
    spec, r = rounds.spec, sealed.round
    total = sum(examples.values())
    staleness = {uid: r - 1 - parse_update_id(uid)[1] for uid in examples}
    weights = {
        uid: n * staleness_weight(staleness[uid], spec.staleness_exponent) / total
        for uid, n in examples.items()
    }
    notes: dict[str, Any] = {}
    if "clip" in spec.options:
        clipped = len(meta.examples) - meta.unclipped
        notes["clip"] = {"bound": spec.options["clip"], "clipped": clipped}
    return {
        "job": spec.job,
        "version": r,
        "mode": "async",
        "state": "committed",
        "model_version": r,
        "included": sorted(examples),
        "staleness": staleness,
        "examples": examples,
        "weights": weights,
        "num_examples": total,
        "excluded": [
            {"update": uid, "client": parse_update_id(uid)[0], "reason": why}
            for uid, why in sorted(excluded)
        ],
        "void_slots": spec.buffer - len(meta.examples) - len(meta.excluded),
        "sealed_reason": sealed.reason,
        "strategy": spec.strategy,
        "staleness_exponent": spec.staleness_exponent,
        "committed_at": now,
        # weighted by num_examples (not staleness), over the updates in the model
        "metrics": meta.metrics.means() if examples else {},
        **notes,
    }
