"""The invariant checker run after every fault scenario: from storage alone (and the answers the
clients got), is every accepted update counted exactly once, in exactly one leaf of its round's
tree, and every model right?"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from microfl import shards
from microfl.jobs import load_job, model_key, validate_update
from microfl.rounds import Rounds, Seal, update_key
from microfl.serde import partial_from_safetensors, tensors_from_safetensors
from microfl.store import ObjectStore

__all__ = ["Verdict", "check_job"]


@dataclass
class Verdict:
    rounds_committed: int
    accepted: int
    lost: list[str] = field(default_factory=list)  # "round/client" answered 2xx, in no record
    double_counted: list[str] = field(default_factory=list)
    wrong_models: list[str] = field(default_factory=list)
    late_rounds: list[str] = field(default_factory=list)
    bad_trees: list[str] = field(default_factory=list)  # "round r: what is wrong with its leaves"

    @property
    def ok(self) -> bool:
        return not (
            self.lost
            or self.double_counted
            or self.wrong_models
            or self.late_rounds
            or self.bad_trees
        )


def check_job(
    store: ObjectStore,
    job: str,
    accepted: set[tuple[int, str]],
    slack: float = 60.0,
    rtol: float = 1e-6,
) -> Verdict:
    """`accepted`: the (round, client) pairs whose upload was answered 200 or 202."""
    spec = load_job(store, job)
    rounds = Rounds(store, spec)
    latest = rounds.latest_version()
    verdict = Verdict(rounds_committed=latest, accepted=len(accepted))
    listed: Counter[tuple[int, str]] = Counter()
    for r in range(1, latest + 1):
        record = rounds.record(r)
        if record is None:
            verdict.late_rounds.append(f"round {r}: model committed but no round record")
            continue
        listed.update((r, c) for c in record["included"])
        listed.update((r, e["client"]) for e in record["excluded"])
        verdict.bad_trees += [f"round {r}: {why}" for why in _tree_problems(rounds, r, record)]
        opened = rounds.opened_at(r)
        if opened is not None and record["committed_at"] - opened > spec.round_timeout + slack:
            verdict.late_rounds.append(
                f"round {r} committed {record['committed_at'] - opened:.0f}"
                f"s after it opened (deadline {spec.round_timeout:g}s)"
            )
        if spec.strategy == "fedavg" and not _model_is_fedavg(store, job, r, record, rtol):
            verdict.wrong_models.append(f"round {r}")
    committed = {key for key in accepted if key[0] <= latest}
    verdict.lost = sorted(f"{r}/{c}" for r, c in committed if listed[(r, c)] == 0)
    verdict.double_counted = sorted(f"{r}/{c}" for (r, c), n in listed.items() if n > 1)
    return verdict


def _tree_problems(rounds: Rounds, r: int, record: dict) -> list[str]:
    """The sealed tree's leaves are disjoint, hold exactly the seal's clients, and those they
    folded are exactly the record's `included`, with the record's example counts."""
    seal = rounds.seal(r)
    if seal is None:
        return ["committed without a seal"]
    if rounds.spec.sharded:
        return _shard_problems(rounds, seal, record)
    sizes = seal.tree.sizes
    folded: Counter[str] = Counter()
    members: Counter[str] = Counter()
    examples: dict[str, int] = {}
    for j in range(sizes[0] if sizes else 0):
        data = rounds.node(r, 0, j)
        if data is None:
            return [f"leaf {j} of {sizes[0]} is missing"]
        meta = partial_from_safetensors(data)[1]
        folded.update(c for c, _ in meta.examples)
        members.update([c for c, _ in meta.examples] + [c for c, _ in meta.excluded])
        examples.update(meta.examples)
    problems = [f"{c} is in {n} leaves" for c, n in sorted(members.items()) if n > 1]
    if set(members) != set(seal.clients):
        problems.append(
            f"leaves hold {sorted(set(members) - set(seal.clients))} beyond the seal and miss "
            f"{sorted(set(seal.clients) - set(members))}"
        )
    if record["included"] and (
        set(folded) != set(record["included"]) or examples != record.get("examples", examples)
    ):
        problems.append("the leaves' folded updates are not the record's included")
    return problems


def _shard_problems(rounds: Rounds, seal: Seal, record: dict) -> list[str]:
    """Every level-0 shard counted the seal's clients, each once, and left out the same ones for
    the same reasons; what they counted is the record's `included`."""
    r, lay = seal.round, shards.layout(rounds.spec, seal)
    metas = []
    for j in range(lay.count):
        try:
            metas.append(shards.read_node(rounds, r, 0, j)[1])
        except ValueError as exc:
            return [str(exc)]
    problems = [f"shard {j} counted other updates than shard 0" for j, m in enumerate(metas)
                if m != metas[0]]
    members = [c for c, _ in metas[0].examples] + [c for c, _ in metas[0].excluded]
    if sorted(members) != sorted(seal.clients):
        problems.append(f"shards hold {sorted(members)}, the seal {sorted(seal.clients)}")
    if record["included"] and sorted(c for c, _ in metas[0].examples) != record["included"]:
        problems.append("the shards' counted updates are not the record's included")
    return problems


def _model_is_fedavg(store: ObjectStore, job: str, r: int, record: dict, rtol: float) -> bool:
    """Recompute model r offline from the stored updates the record includes."""
    spec = load_job(store, job)
    total: dict[str, np.ndarray] = {}
    weight = 0
    for client in record["included"]:
        tensors, metadata = tensors_from_safetensors(store.read(update_key(job, r, client)) or b"")
        n = validate_update(spec, tensors, metadata)
        weight += n
        for name, arr in tensors.items():
            total[name] = total.get(name, 0) + arr.astype(np.float64) * n
    model, _ = tensors_from_safetensors(store.read(model_key(job, r)) or b"")
    if weight == 0:
        previous, _ = tensors_from_safetensors(store.read(model_key(job, r - 1)) or b"")
        return all(np.array_equal(model[k], previous[k]) for k in model)
    for name, arr in model.items():
        want = total[name] / weight
        if arr.dtype.kind in "iub":  # integer tensors hold the rounded mean
            want = np.rint(want)
        scale = max(float(np.max(np.abs(want))), 1e-12)
        if float(np.max(np.abs(arr.astype(np.float64) - want))) > rtol * scale:
            return False
    return True
