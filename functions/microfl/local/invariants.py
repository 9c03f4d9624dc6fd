"""The invariant checker run after every fault scenario: from storage alone (and the answers the
clients got), is every accepted update counted exactly once, in exactly one leaf of its round's
tree, and every model right?"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from microfl import shards
from microfl.buffers import Buffers, parse_update_id, update_id
from microfl.buffers import update_key as async_update_key
from microfl.compress import dense
from microfl.jobs import JobSpec, load_job, model_key, optimizer_key, validate_update
from microfl.local.reference import clipped, fedavg, fedavg_error, fedbuff, krum, statistic
from microfl.privacy import DP, DpState, generator, noise_key
from microfl.rounds import Rounds, Seal, update_key
from microfl.serde import partial_from_safetensors, tensors_from_safetensors
from microfl.store import ObjectStore
from microfl.strategy import cast_like

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
    secret: bytes = b"",
) -> Verdict:
    """`accepted`: the (round, client) pairs whose upload was answered 200 or 202; for an
    async job the (base_version, client) pairs. With the functions' secret, dp-fedavg models
    are recomputed too (their noise is keyed by it)."""
    spec = load_job(store, job)
    if spec.is_async:
        return _check_async(store, spec, accepted, rtol)
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
        if not _model_is_right(store, job, r, record, rtol, secret):
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
    problems = [
        f"shard {j} counted other updates than shard 0"
        for j, m in enumerate(metas)
        if m != metas[0]
    ]
    members = [c for c, _ in metas[0].examples] + [c for c, _ in metas[0].excluded]
    if sorted(members) != sorted(seal.clients):
        problems.append(f"shards hold {sorted(members)}, the seal {sorted(seal.clients)}")
    if record["included"] and sorted(c for c, _ in metas[0].examples) != record["included"]:
        problems.append("the shards' counted updates are not the record's included")
    return problems


def _model_is_right(
    store: ObjectStore, job: str, r: int, record: dict, rtol: float, secret: bytes
) -> bool:
    """Recompute model r offline from the stored updates the record includes: FedAvg (of the
    clipped updates with `clip`) within rtol, median / trimmed-mean / krum (its choice too) bit
    for bit, dp-fedavg (given the secret) as the clipped mean plus the keyed noise within rtol.
    fedadam is not recomputed (its moments are the server's state)."""
    spec = load_job(store, job)
    base, _ = tensors_from_safetensors(store.read(model_key(job, r - 1)) or b"")
    model, _ = tensors_from_safetensors(store.read(model_key(job, r)) or b"")
    if not record["included"]:
        return all(np.array_equal(model[k], base[k]) for k in model)
    if spec.strategy == "fedadam" or (spec.strategy == DP and not secret):
        return True
    updates = []
    for client in record["included"]:
        tensors, metadata = tensors_from_safetensors(store.read(update_key(job, r, client)) or b"")
        n = validate_update(spec, tensors, metadata)
        updates.append((dense(tensors, base), n))  # F16/BF16 widened, int8 dequantised
    names = sorted(base)
    if spec.sharded:
        xs = [u for u, _ in updates]
        if spec.strategy == "krum":
            flat = np.stack(
                [np.concatenate([u[k].astype(np.float64).ravel() for k in names]) for u in xs]
            )
            chosen = krum(flat, int(spec.options["f"]), int(spec.options["m"]))
            if record.get("selected") != [record["included"][i] for i in chosen]:
                return False
        want = cast_like(statistic(spec.strategy, spec.options, xs, names), base)
        return all(model[k].tobytes() == want[k].tobytes() for k in names)
    if spec.strategy == DP:
        saved = store.read(optimizer_key(job, r - 1))
        bound = DpState.from_tensors(
            spec.options, tensors_from_safetensors(saved)[0] if saved else None
        ).clip
        mean = fedavg((clipped(u, base, bound, dp=True)[0], 1) for u, _ in updates)
        std = spec.options["noise_multiplier"] * bound / len(updates)
        for k in names:
            if base[k].dtype.kind == "f":
                rng = generator(noise_key(secret), job, r, f"sum/{k}")
                mean[k] = mean[k] + rng.standard_normal(base[k].shape) * std
        return fedavg_error(model, mean) <= rtol
    if "clip" in spec.options:
        updates = [(clipped(u, base, spec.options["clip"])[0], n) for u, n in updates]
    return fedavg_error(model, fedavg(updates)) <= rtol


def _check_async(
    store: ObjectStore, spec: JobSpec, accepted: set[tuple[int, str]], rtol: float
) -> Verdict:
    """Every accepted update whose claim names a committed version is in that version's record
    and in no other; each version's leaves folded exactly its `included`; each fedavg model is
    FedBuff's (numpy, microfl.local.reference.fedbuff) within rtol. No deadline check: a
    version waits for K updates, not for a clock."""
    rounds, buf = Rounds(store, spec), Buffers(store, spec)
    latest = rounds.latest_version()
    verdict = Verdict(rounds_committed=latest, accepted=len(accepted))
    listed: Counter[str] = Counter()
    for r in range(1, latest + 1):
        record = rounds.record(r)
        if record is None:
            verdict.late_rounds.append(f"version {r}: model committed but no record")
            continue
        listed.update(record["included"])
        listed.update(e["update"] for e in record["excluded"])
        folded: Counter[str] = Counter()
        seal = rounds.seal(r)
        for j in range(seal.tree.sizes[0] if seal else 0):
            data = rounds.node(r, 0, j)
            if data is not None:
                folded.update(c for c, _ in partial_from_safetensors(data)[1].examples)
        if record["included"] and sorted(folded.elements()) != record["included"]:
            verdict.bad_trees.append(f"version {r}: the leaves did not fold its included")
        if spec.strategy == "fedavg" and not _version_is_right(store, spec, r, record, rtol):
            verdict.wrong_models.append(f"version {r}")
    for base, client in sorted(accepted):
        place = buf.claim(base, client)
        if place is None or (place.buffer <= latest and listed[update_id(client, base)] == 0):
            verdict.lost.append(f"{client}@{base}")
    verdict.double_counted = sorted(u for u, n in listed.items() if n > 1)
    return verdict


def _version_is_right(store: ObjectStore, spec: JobSpec, r: int, record: dict, rtol: float) -> bool:
    def model(v: int) -> dict[str, np.ndarray]:
        return tensors_from_safetensors(store.read(model_key(spec.job, v)) or b"")[0]

    current, got = model(r - 1), model(r)
    if not record["included"]:
        return all(np.array_equal(got[k], current[k]) for k in got)
    updates = []
    for uid in record["included"]:
        client, base = parse_update_id(uid)
        tensors, meta = tensors_from_safetensors(
            store.read(async_update_key(spec.job, base, client)) or b""
        )
        n = validate_update(spec, tensors, meta)
        updates.append((dense(tensors, model(base)), n, model(base), r - 1 - base))
    exact = fedbuff(current, updates, spec.staleness_exponent, spec.options.get("clip"))
    return fedavg_error(got, exact) <= rtol
