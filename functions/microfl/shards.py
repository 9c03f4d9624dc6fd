"""Robust rounds (median, trimmed mean, Krum) computed over coordinate shards after the seal.

The model is flattened (tensors in schema order, concatenated) and cut into shards of `width`
coordinates. Shard j's builder reads, for each sealed client in order, only the bytes of its
slice (ranged reads), so it holds an (N, width) float64 matrix whatever the model's size:

    width = max(1, (usable - fixed) // (N * 8 * WORKING_COPIES)), at most the model's

usable = the memory budget less 1/16 (HEADROOM: read buffers, the result, the allocator's
slack: load/bench/robust_compare.py measured 3-7 MiB above the two copies at 256 MiB), N = the
seal's clients, 8 bytes a float64 value, WORKING_COPIES = 2 (the matrix and the copy
np.partition / the centring makes), fixed = Krum's N x N matrices (KRUM_MATRICES of them) or 0.

Nodes are `nodes/{level}/{j}` of the round (create-only, like the summing tree's):
- median, trimmed-mean: level 0 node j = the statistic over shard j; the commit assembles them.
- krum: level 0 node j = the (n, n) squared distances over shard j; once all exist finalize sums
  them in shard order and writes `selection.json` (create-only); level 1 node j = the unweighted
  mean of the selected rows over shard j; the commit assembles those.

Every node's __metadata__ names the clients it counted and those it left out and why. A client
is left out on its stored header alone (read within spec.header_limit, checked against the job's
schema like validate_update, and the object's size): every shard decides alike. Values are not
checked here (ingest refused non-finite ones); a non-finite result is caught at the commit, which
then keeps model r-1 as the summing path does."""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np

from microfl import robust
from microfl.clientmetrics import MetricSums, client_metrics
from microfl.compress import widen
from microfl.errors import InvalidUpdate, MicroFLError, PoisonEvent
from microfl.faults import failpoint
from microfl.jobs import JobSpec, model_key, validate_update
from microfl.rounds import Rounds, Seal
from microfl.serde import (
    DTYPES,
    safetensors_data_size,
    tensors_from_safetensors,
    tensors_from_safetensors_file,
    tensors_to_safetensors,
)
from microfl.store import ObjectStore
from microfl.strategy import cast_like

__all__ = [
    "HEADROOM",
    "WORKING_COPIES",
    "Layout",
    "ShardMeta",
    "build_shard",
    "commit",
    "layout",
    "missing",
    "read_node",
    "select",
]

WORKING_COPIES = 2
HEADROOM = 16  # 1/HEADROOM of the budget is left for what is not the matrix
KRUM_MATRICES = 4  # the Gram product, the distances, their upper triangle, the result
FORMAT = "microfl.shard.v1"


@dataclass(frozen=True)
class Layout:
    """Round r's coordinate shards: `width` coordinates each (the last one fewer)."""

    spec: JobSpec
    clients: int  # N, the seal's clients
    width: int

    @cached_property
    def starts(self) -> tuple[int, ...]:
        """The flat coordinate where each tensor of the schema starts, and the total last."""
        out = [0]
        for t in self.spec.schema:
            out.append(out[-1] + math.prod(t.shape))
        return tuple(out)

    @property
    def count(self) -> int:
        return max(1, math.ceil(self.starts[-1] / self.width))

    @property
    def levels(self) -> int:
        return 2 if self.spec.strategy == "krum" else 1

    def span(self, j: int) -> tuple[int, int]:
        return j * self.width, min((j + 1) * self.width, self.starts[-1])

    def pieces(self, lo: int, hi: int) -> list[tuple[int, int, int]]:
        """(tensor index, first, end) of the tensors' coordinates inside [lo, hi)."""
        out = []
        for i in range(len(self.spec.schema)):
            first, end = max(lo, self.starts[i]), min(hi, self.starts[i + 1])
            if first < end:
                out.append((i, first - self.starts[i], end - self.starts[i]))
        return out


def layout(spec: JobSpec, sealed: Seal) -> Layout:
    n = max(1, len(sealed.clients))
    total = sum(math.prod(t.shape) for t in spec.schema)
    fixed = KRUM_MATRICES * n * n * 8 if spec.strategy == "krum" else 0
    usable = spec.memory_budget - spec.memory_budget // HEADROOM
    width = (usable - fixed) // (n * 8 * WORKING_COPIES)
    return Layout(spec, len(sealed.clients), max(1, min(total, width)))


@dataclass(frozen=True)
class ShardMeta:
    """What a node counted: (client, num_examples) in the seal's order, (client, reason), and
    the counted clients' metric sums (clientmetrics)."""

    examples: tuple[tuple[str, int], ...] = ()
    excluded: tuple[tuple[str, str], ...] = ()
    metrics: MetricSums = MetricSums()


def build_shard(store: ObjectStore, spec: JobSpec, r: int, level: int, j: int) -> bool:
    """Write node (level, j) of sealed robust round r unless it exists; True if this call wrote
    it. Deterministic: a retry writes the same bytes."""
    rounds = Rounds(store, spec)
    if rounds.node_exists(r, level, j):
        return False
    sealed = rounds.seal(r)
    if sealed is None:
        raise PoisonEvent(f"round {r} is not sealed; its shards are requested after the seal")
    lay = layout(spec, sealed)
    if not (0 <= level < lay.levels and 0 <= j < lay.count):
        raise PoisonEvent(f"round {r} has {lay.count} shards on {lay.levels} level(s), not {j}")
    lo, hi = lay.span(j)
    if level == 0:
        x, meta = _read_rows(rounds, lay, r, sealed.clients, lo, hi)
        values = _statistic(spec, x)
    else:
        selection = rounds.selection(r)
        if selection is None:
            raise PoisonEvent(f"round {r} has no Krum selection; level 1 is requested after it")
        x, meta = _read_rows(rounds, lay, r, selection["clients"], lo, hi)
        if meta.excluded:  # they passed at level 0, and a stored update never changes
            raise ValueError(f"round {r}: selected updates became invalid: {meta.excluded}")
        values = robust.mean_rows(x) if len(x) else np.zeros(0)
    rounds.create_node(r, level, j, _node_to_bytes(values, meta, lo, hi))
    failpoint("shards.after_node")
    return True


def _statistic(spec: JobSpec, x: np.ndarray) -> np.ndarray:
    if spec.strategy == "krum":
        return robust.sq_distances(x)
    if x.shape[0] == 0:  # every update left out: the commit keeps model r-1
        return np.zeros(0)
    if spec.strategy == "median":
        return robust.median(x)
    return robust.trimmed_mean(x, spec.options["beta"])


def _read_rows(
    rounds: Rounds, lay: Layout, r: int, clients: Sequence[str], lo: int, hi: int
) -> tuple[np.ndarray, ShardMeta]:
    """The (n, hi - lo) float64 slice of the clients' updates that are valid, and the meta."""
    x = np.empty((len(clients), hi - lo), dtype=np.float64)
    examples: list[tuple[str, int]] = []
    excluded: list[tuple[str, str]] = []
    metrics = MetricSums()
    for client in clients:
        try:
            found = _header(rounds, r, client)
        except MicroFLError as exc:
            excluded.append((client, f"stored update is invalid: {exc}"))
            continue
        if found is None:
            excluded.append((client, "update object is missing from storage"))
            continue
        n, offsets, reported = found
        row = x[len(examples)]
        for i, first, end in lay.pieces(lo, hi):
            t = lay.spec.schema[i]
            start, dtype = offsets[t.name]  # the update's own: F16 or BF16 for an F32 tensor
            begin = start + first * dtype.itemsize
            raw = rounds.read_update_range(r, client, begin, (end - first) * dtype.itemsize)
            if raw is None or len(raw) != (end - first) * dtype.itemsize:
                raise ValueError(f"round {r}: the update of {client} changed while read")
            at = lay.starts[i] + first - lo
            row[at : at + end - first] = widen(np.frombuffer(raw, dtype=dtype))
        examples.append((client, n))
        metrics += MetricSums.of(reported, n)
        failpoint("shards.mid_read")
    return x[: len(examples)], ShardMeta(tuple(examples), tuple(excluded), metrics)


def _header(
    rounds: Rounds, r: int, client: str
) -> tuple[int, dict[str, tuple[int, np.dtype]], dict[str, float]] | None:
    """(num_examples, where each tensor's data starts in the object and its dtype, its
    metrics) from one ranged read of at most 8 + header_limit bytes (and a 2-byte read at the
    expected end, for the object's size, when it is longer than that); None if the object is
    missing. The checks are serde's and validate_update's, so the reasons are theirs."""
    spec = rounds.spec
    limit = spec.header_limit
    head = rounds.read_update_range(r, client, 0, 8 + limit)
    if head is None:
        return None
    size = len(head)
    if size == 8 + limit:  # the object may be longer: it must be exactly what its header says
        (n,) = struct.unpack("<Q", head[:8])
        size = 8 + n + (safetensors_data_size(head[8 : 8 + n]) if n <= limit else 0)
        if n <= limit:
            tail = rounds.read_update_range(r, client, size - 1, 2)
            if tail is None or len(tail) != 1:
                raise InvalidUpdate(
                    f"the object is not the {size} bytes its header and schema make"
                )
    tensors, metadata = tensors_from_safetensors_file(io.BytesIO(head), size, limit)
    n_examples = validate_update(spec, tensors, metadata, values=False)
    offsets = {name: (t.begin, t.dtype) for name, t in tensors.items()}
    return n_examples, offsets, client_metrics(metadata)


def _node_to_bytes(values: np.ndarray, meta: ShardMeta, lo: int, hi: int) -> bytes:
    metadata = {
        "format": FORMAT,
        "span": f"{lo},{hi}",
        "examples": json.dumps([list(e) for e in meta.examples], separators=(",", ":")),
        "excluded": json.dumps([list(e) for e in meta.excluded], separators=(",", ":")),
    }
    if meta.metrics.sums:
        metadata["metrics"] = meta.metrics.to_text()
    return tensors_to_safetensors({"values": values}, metadata)


def read_node(rounds: Rounds, r: int, level: int, j: int) -> tuple[np.ndarray, ShardMeta]:
    """A shard node's values and meta; ValueError if it is missing or not a shard node."""
    data = rounds.node(r, level, j)
    if data is None:
        raise ValueError(f"round {r}: shard {j} of level {level} is missing")
    tensors, metadata = tensors_from_safetensors(data)
    if metadata.get("format") != FORMAT:
        raise ValueError(f"round {r}: node {level}/{j} is not a shard of format {FORMAT}")
    examples = tuple((str(c), int(n)) for c, n in json.loads(metadata["examples"]))
    excluded = tuple((str(c), str(why)) for c, why in json.loads(metadata["excluded"]))
    metrics = MetricSums.from_text(metadata.get("metrics", "[]"))  # older nodes: none
    return tensors["values"], ShardMeta(examples, excluded, metrics)


# --- finalize's side ---------------------------------------------------------------------------


def missing(rounds: Rounds, sealed: Seal) -> list[tuple[int, int]] | None:
    """The nodes finalize should request now (missing, their inputs present), or None once the
    round's last level is complete (commit). For Krum, writes the selection when level 0 is
    complete. One listing of the nodes."""
    lay = layout(rounds.spec, sealed)
    r = sealed.round
    built = rounds.nodes(r)
    for level in range(lay.levels):
        wanted = [(level, j) for j in range(lay.count) if (level, j) not in built]
        if wanted:
            return wanted
        if level == 0 and lay.levels == 2 and rounds.selection(r) is None:
            select(rounds, sealed, lay)
    return None


def select(rounds: Rounds, sealed: Seal, lay: Layout) -> dict[str, Any]:
    """Krum's choice from the level-0 distance matrices summed in shard order (one in memory
    besides the sum), written once."""
    r, options = sealed.round, rounds.spec.options
    total: np.ndarray | None = None
    meta = ShardMeta()
    for j in range(lay.count):
        d, meta = read_node(rounds, r, 0, j)
        total = d.copy() if total is None else np.add(total, d, out=total)
    rows = [c for c, _ in meta.examples]
    d = total if total is not None and len(rows) else np.zeros((0, 0))
    chosen = robust.krum_select(d, int(options["f"]), int(options["m"]))
    scores = robust.krum_scores(d, int(options["f"]))
    doc = {
        "round": r,
        "f": int(options["f"]),
        "m": int(options["m"]),
        "clients": [rows[i] for i in chosen],
        "scores": {
            c: (float(s) if math.isfinite(s) else None) for c, s in zip(rows, scores, strict=True)
        },
    }
    doc = rounds.create_selection(r, doc)
    failpoint("shards.after_selection")
    return doc


def commit(rounds: Rounds, sealed: Seal, now: float) -> bool | None:
    """Assemble model r from the last level's shards (the model and one shard in memory) and
    write it, then the round record, both create-only. None while a shard is missing; else
    whether this call wrote the record."""
    spec, r = rounds.spec, sealed.round
    if missing(rounds, sealed) is not None:
        return None
    lay = layout(spec, sealed)
    top = lay.levels - 1
    meta = read_node(rounds, r, 0, 0)[1]
    included = [c for c, _ in meta.examples]
    excluded = [{"client": c, "reason": why} for c, why in meta.excluded]
    late = sorted(set(rounds.update_clients(r)) - set(sealed.clients))
    excluded += [{"client": c, "reason": f"arrived after round {r} was sealed"} for c in late]
    extra: dict[str, Any] = {}
    if spec.strategy == "krum":
        selection = rounds.selection(r) or {}
        extra = {"selected": selection["clients"], "scores": selection["scores"]}
    if included and not _write_model(rounds, lay, r, top):
        why = f"the {spec.strategy} of round {r} is not finite; round {r} keeps model {r - 1}"
        excluded += [{"client": c, "reason": why} for c in included]
        included = []
    if not included:  # nothing usable: model r is model r-1
        previous = rounds.model(r - 1)
        if previous is None:
            raise PoisonEvent(f"job {spec.job!r} has no model version {r - 1}")
        rounds.store.create(model_key(spec.job, r), previous)
    examples = {c: n for c, n in meta.examples if c in set(included)}
    # every counted update's metrics, Krum's unselected ones too (`included`, as for examples)
    extra["metrics"] = meta.metrics.means() if included else {}
    record: dict[str, Any] = {
        "job": spec.job,
        "round": r,
        "state": "committed",
        "model_version": r,
        "included": sorted(included),
        "examples": examples,
        "num_examples": sum(examples.values()),
        "excluded": sorted(excluded, key=lambda e: e["client"]),
        "sealed_reason": sealed.reason,
        "strategy": spec.strategy,
        "committed_at": now,
        **extra,
    }
    return rounds.create_record(r, record)


def _write_model(rounds: Rounds, lay: Layout, r: int, level: int) -> bool:
    """Model r from the shards of `level`, cast to the model's dtypes; False (writing nothing)
    if it holds NaN or Inf."""
    spec = lay.spec
    model = {t.name: np.empty(t.shape, dtype=DTYPES[t.dtype]) for t in spec.schema}
    flat = [model[t.name].reshape(-1) for t in spec.schema]
    counted = read_node(rounds, r, level, 0)[1]
    for j in range(lay.count):
        values, meta = read_node(rounds, r, level, j)
        if meta != counted:
            raise ValueError(f"round {r}: shards 0 and {j} of level {level} counted other updates")
        lo, hi = lay.span(j)
        if values.shape != (hi - lo,):
            raise ValueError(f"round {r}: shard {j} holds {values.shape}, not ({hi - lo},)")
        if not np.isfinite(values).all():  # before integer tensors cast it away
            return False
        for i, first, end in lay.pieces(lo, hi):
            at = lay.starts[i] + first - lo
            piece = {"v": values[at : at + end - first]}
            with np.errstate(all="ignore"):
                flat[i][first:end] = cast_like(piece, {"v": flat[i]})["v"]
    if not all(np.isfinite(a).all() for a in model.values() if a.dtype.kind == "f"):
        return False
    rounds.store.create(model_key(spec.job, r), tensors_to_safetensors(model))
    failpoint("shards.after_model")
    return True
