"""The round repository: where a job's rounds live in storage and what storage says about them.

Layout under `jobs/{job}/rounds/{r:08d}/` (every object written once, create-only):

    updates/{client}                    a client's update
    slots/{n:08d}                       position n of the round's aggregation tree (JSON: client)
    claims/{client}                     the client's update holds slot n (JSON: slot)
    closing.json                        the decision to seal, written before the seal's listing
    seal.json                           which updates are in, and the positions past the slots
    requests/{l:02d}-{j:06d}.{a:02d}    node j of level l requested (attempt a; JSON: at)
    nodes/{l:02d}/{j:06d}.safetensors   exact partial sum of node j of level l (serde.partial_*),
                                        or coordinate shard j of a robust round (microfl.shards)
    selection.json                      Krum's choice, from the level-0 shards (microfl.shards)
    record.json                         the round record, written after model r

Slots are claimed while a round fills, so leaves are folded before the seal. Slots are never
deleted and a slot is only created right above an occupied one, so the occupied slots are always
a prefix 0..S-1: one exists call answers "are slots 0..n all taken", and the first free slot is
found by galloping and bisection. Services ask this module about rounds and never build keys.
"""

from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import IO, Any

from microfl.errors import JobNotFound, RoundNotOpen
from microfl.jobs import JobSpec, model_key
from microfl.serde import json_from_bytes, json_to_bytes
from microfl.store import ObjectStore

__all__ = [
    "Rounds",
    "Seal",
    "Tree",
    "branch",
    "claim_key",
    "closing_key",
    "node_key",
    "nodes_prefix",
    "record_key",
    "request_key",
    "seal_key",
    "selection_key",
    "slot_key",
    "update_key",
    "updates_prefix",
]


def _round(job: str, r: int) -> str:
    return f"jobs/{job}/rounds/{r:08d}"


def updates_prefix(job: str, r: int) -> str:
    return f"{_round(job, r)}/updates/"


def update_key(job: str, r: int, client: str) -> str:
    return updates_prefix(job, r) + client


def slot_key(job: str, r: int, n: int) -> str:
    return f"{_round(job, r)}/slots/{n:08d}"


def _claims_prefix(job: str, r: int) -> str:
    return f"{_round(job, r)}/claims/"


def claim_key(job: str, r: int, client: str) -> str:
    return _claims_prefix(job, r) + client


def closing_key(job: str, r: int) -> str:
    """Written before the sealer lists the updates: an upload (or a leaf's builder) that finds
    it must wait for the seal to learn whether its update made the round."""
    return f"{_round(job, r)}/closing.json"


def seal_key(job: str, r: int) -> str:
    return f"{_round(job, r)}/seal.json"


def _requests_prefix(job: str, r: int) -> str:
    return f"{_round(job, r)}/requests/"


def request_key(job: str, r: int, level: int, j: int, attempt: int) -> str:
    return f"{_requests_prefix(job, r)}{level:02d}-{j:06d}.{attempt:02d}"


def nodes_prefix(job: str, r: int) -> str:
    return f"{_round(job, r)}/nodes/"


def node_key(job: str, r: int, level: int, j: int) -> str:
    return f"{nodes_prefix(job, r)}{level:02d}/{j:06d}.safetensors"


def selection_key(job: str, r: int) -> str:
    return f"{_round(job, r)}/selection.json"


def record_key(job: str, r: int) -> str:
    return f"{_round(job, r)}/record.json"


@dataclass(frozen=True)
class Seal:
    """Round r's seal: `clients` (sorted) are in. Tree positions 0..slots-1 are the slot objects
    (a slot's client counts there iff it is in `clients` and not in `tail`); positions
    slots.. are `tail`, the included updates without a claim when the seal listed the claims."""

    round: int
    clients: tuple[str, ...]
    fan_in: int
    reason: str  # "quorum" or "deadline"
    sealed_at: float
    # What sealed it, for the record only: "client:<id>" or "internal:sweep".
    trigger: str = ""
    slots: int = 0
    tail: tuple[str, ...] = ()

    @property
    def tree(self) -> Tree:
        return Tree(self.slots + len(self.tail), self.fan_in)

    def member(self, position: int, slot_client: str | None) -> str | None:
        """Who position counts for: slot_client is the slot object's (positions < slots)."""
        if position >= self.slots:
            i = position - self.slots
            return self.tail[i] if i < len(self.tail) else None
        if slot_client is None or slot_client in self._tail or slot_client not in self._in:
            return None
        return slot_client

    @cached_property
    def _in(self) -> frozenset[str]:
        return frozenset(self.clients)

    @cached_property
    def _tail(self) -> frozenset[str]:
        return frozenset(self.tail)

    def to_bytes(self) -> bytes:
        return json_to_bytes(
            {**asdict(self), "clients": list(self.clients), "tail": list(self.tail)}
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Seal:
        """Seals written before slots (2027-01) place every client in the tail, sorted."""
        doc = json_from_bytes(data)
        clients = tuple(doc["clients"])
        return cls(
            doc["round"],
            clients,
            doc["fan_in"],
            doc["reason"],
            doc["sealed_at"],
            doc.get("trigger", ""),
            int(doc.get("slots", 0)),
            tuple(doc["tail"]) if "tail" in doc else clients,
        )


@dataclass(frozen=True)
class Tree:
    """The aggregation tree over `positions` positions: a leaf holds K = fan_in positions and an
    inner node F = branch children, so node j of level l covers positions [j * K * F**l,
    (j+1) * K * F**l); levels go up until one has at most F nodes (the top, which the commit
    merges). A node's content depends only on its positions' members, so a node built while
    the round fills is the node the sealed tree needs."""

    positions: int
    fan_in: int

    @property
    def branch(self) -> int:
        return branch(self.fan_in)

    @property
    def sizes(self) -> list[int]:
        """Nodes per level, bottom (leaves) to top; [] for an empty round."""
        if self.positions == 0:
            return []
        sizes = [math.ceil(self.positions / self.fan_in)]
        while sizes[-1] > self.branch:
            sizes.append(math.ceil(sizes[-1] / self.branch))
        return sizes

    def positions_of(self, j: int) -> range:
        """The positions of leaf j."""
        k = self.fan_in
        return range(j * k, min((j + 1) * k, self.positions))

    def children(self, level: int, j: int) -> range:
        """Indices at level-1 of the children of node (level, j), level >= 1."""
        f, below = self.branch, self.sizes[level - 1]
        return range(j * f, min((j + 1) * f, below))


def branch(fan_in: int) -> int:
    """Children per inner node: fan_in, but at least 2 so that the tree has a top."""
    return max(2, fan_in)


class Rounds:
    """One job's rounds in storage. The only in-process state is `_hint`, the slot after the
    last one this process claimed or saw: a place to start probing, never a decision (see
    claim_slot)."""

    _hint: dict[tuple[str, str, int], int] = {}
    _hint_lock = threading.Lock()

    def __init__(self, store: ObjectStore, spec: JobSpec) -> None:
        self.store, self.spec, self.job = store, spec, spec.job

    # --- versions and the open round -----------------------------------------------------------

    def latest_version(self) -> int:
        """The newest committed model version (0 is written at job creation); lists models/."""
        prefix = f"jobs/{self.job}/models/"
        versions = [int(k[len(prefix) :].split(".")[0]) for k in self.store.list(prefix)]
        if not versions:
            raise JobNotFound(f"job {self.job!r} has no initial model")
        return max(versions)

    def open_round(self, version: int | None = None) -> int | None:
        """The round that trains on `version` (default the latest), None when all are done."""
        version = self.latest_version() if version is None else version
        return version + 1 if version < self.spec.rounds else None

    def is_open(self, r: int) -> bool:
        """Round r takes updates: its base model exists and nobody decided to seal it (no
        listing: model r cannot exist before round r's closing marker)."""
        return (
            1 <= r <= self.spec.rounds
            and self.store.exists(model_key(self.job, r - 1))
            and not self.store.exists(closing_key(self.job, r))
        )

    def require_open(self, r: int) -> None:
        if self.is_open(r):
            return
        current = self.open_round()
        if current is None:
            raise RoundNotOpen(f"job {self.job!r} has finished all {self.spec.rounds} rounds")
        if r != current:
            raise RoundNotOpen(
                f"round {r} is not open; the open round is {current} "
                f"(GET /v1/jobs/{self.job} tells which)"
            )
        raise RoundNotOpen(f"round {r} is sealed and takes no more updates; wait for round {r + 1}")

    def opened_at(self, r: int) -> float | None:
        """When round r opened: job creation, or the commit of round r-1 (None while that
        round's record is not written yet, so no deadline can fire early)."""
        if r <= 1:
            return self.spec.created_at
        record = self.record(r - 1)
        return float(record["committed_at"]) if record else None

    def model(self, version: int) -> bytes | None:
        return self.store.read(model_key(self.job, version))

    # --- updates -------------------------------------------------------------------------------

    def update_clients(self, r: int) -> list[str]:
        """Every client with an update stored for round r, sorted (one listing)."""
        prefix = updates_prefix(self.job, r)
        return [k[len(prefix) :] for k in self.store.list(prefix)]

    def read_update(self, r: int, client: str) -> bytes | None:
        return self.store.read(update_key(self.job, r, client))

    def read_update_range(self, r: int, client: str, start: int, length: int) -> bytes | None:
        return self.store.read_range(update_key(self.job, r, client), start, length)

    def read_update_to_file(self, r: int, client: str, out: IO[bytes]) -> bool:
        return self.store.read_to_file(update_key(self.job, r, client), out)

    def create_update(self, r: int, client: str, body: IO[bytes]) -> bool:
        return self.store.create_from_file(update_key(self.job, r, client), body)

    def delete_update(self, r: int, client: str) -> None:
        self.store.delete(update_key(self.job, r, client))

    # --- slots ---------------------------------------------------------------------------------

    def claim_slot(self, r: int, client: str) -> int:
        """Give the client's update (just created by this call) the first free slot of round r,
        and record the claim. Storage decides, through create-only writes; the in-process hint
        is only where probing starts, trusted only once the slot below it is seen taken (then,
        slots being a prefix, all below it are). From there: try to create; if taken, gallop up
        (1, 2, 4, ... past it) and bisect to the first free slot, whose predecessor is taken,
        so the slots stay a prefix."""
        hint_key = (self.store.url, self.job, r)
        low = self._hint.get(hint_key, 0)
        if low and not self.slot_exists(r, low - 1):
            low = 0  # a hint from another life of this job name: start from the bottom
        data = json_to_bytes({"client": client})
        while not self.store.create(slot_key(self.job, r, low), data):
            low = self._first_free(r, low)
        self._see(hint_key, low + 1)
        self.note_claim(r, client, low)
        return low

    def note_claim(self, r: int, client: str, slot: int) -> None:
        """claims/{client}: the seal lists these to tell slotted updates from the rest."""
        self.store.create(claim_key(self.job, r, client), json_to_bytes({"slot": slot}))

    def claimed_clients(self, r: int) -> set[str]:
        prefix = _claims_prefix(self.job, r)
        return {k[len(prefix) :] for k in self.store.list(prefix)}

    @classmethod
    def _see(cls, hint_key: tuple[str, str, int], n: int) -> None:
        with cls._hint_lock:
            if cls._hint.get(hint_key, 0) < n:
                if len(cls._hint) > 1024:
                    cls._hint.clear()
                cls._hint[hint_key] = n

    def slot_exists(self, r: int, n: int) -> bool:
        return self.store.exists(slot_key(self.job, r, n))

    def slot_client(self, r: int, n: int) -> str | None:
        data = self.store.read(slot_key(self.job, r, n))
        return None if data is None else str(json_from_bytes(data)["client"])

    def slot_count(self, r: int) -> int:
        """How many slots are taken (the first free one), by galloping and bisection."""
        if not self.slot_exists(r, 0):
            return 0
        count = self._first_free(r, 0)
        self._see((self.store.url, self.job, r), count)
        return count

    def _first_free(self, r: int, low: int) -> int:
        """The first slot above `low` (taken) that was free when looked at: gallop up 1, 2, 4,
        ... then bisect; its predecessor is taken, so the slots stay a prefix."""
        step = 1
        while self.slot_exists(r, low + step):
            low += step
            step *= 2
        high = low + step
        while high - low > 1:
            mid = (low + high) // 2
            if self.slot_exists(r, mid):
                low = mid
            else:
                high = mid
        return high

    # --- closing, seal, record -----------------------------------------------------------------

    def closing(self, r: int) -> str | None:
        """The reason the round is being sealed, or None while it is open."""
        data = self.store.read(closing_key(self.job, r))
        return None if data is None else str(json_from_bytes(data)["reason"])

    def is_closing(self, r: int) -> bool:
        return self.store.exists(closing_key(self.job, r))

    def create_closing(self, r: int, reason: str) -> str:
        """Decide to seal; the reason that stands (a racer's, if it was first)."""
        self.store.create(closing_key(self.job, r), json_to_bytes({"reason": reason}))
        return self.closing(r) or reason

    def seal(self, r: int) -> Seal | None:
        data = self.store.read(seal_key(self.job, r))
        return None if data is None else Seal.from_bytes(data)

    def create_seal(self, seal: Seal) -> tuple[Seal, bool]:
        """(the seal that stands, whether this call wrote it)."""
        created = self.store.create(seal_key(self.job, seal.round), seal.to_bytes())
        return (seal if created else self.seal(seal.round) or seal), created

    def record(self, r: int) -> dict[str, Any] | None:
        data = self.store.read(record_key(self.job, r))
        return None if data is None else json_from_bytes(data)

    def has_record(self, r: int) -> bool:
        return self.store.exists(record_key(self.job, r))

    def create_record(self, r: int, record: dict[str, Any]) -> bool:
        return self.store.create(record_key(self.job, r), json_to_bytes(record))

    def selection(self, r: int) -> dict[str, Any] | None:
        data = self.store.read(selection_key(self.job, r))
        return None if data is None else json_from_bytes(data)

    def create_selection(self, r: int, doc: dict[str, Any]) -> dict[str, Any]:
        """Krum's choice, once; the one that stands (a racer's, if it was first)."""
        self.store.create(selection_key(self.job, r), json_to_bytes(doc))
        return self.selection(r) or doc

    # --- the tree ------------------------------------------------------------------------------

    def node(self, r: int, level: int, j: int) -> bytes | None:
        return self.store.read(node_key(self.job, r, level, j))

    def node_exists(self, r: int, level: int, j: int) -> bool:
        return self.store.exists(node_key(self.job, r, level, j))

    def create_node(self, r: int, level: int, j: int, data: bytes) -> bool:
        return self.store.create(node_key(self.job, r, level, j), data)

    def nodes(self, r: int) -> set[tuple[int, int]]:
        """(level, j) of every node written (one listing)."""
        prefix = nodes_prefix(self.job, r)
        return {_node_of(k[len(prefix) :]) for k in self.store.list(prefix)}

    def request(self, r: int, level: int, j: int, attempt: int, at: float) -> bool:
        """Mark node (level, j) requested; True for the one call that may publish the request."""
        return self.store.create(
            request_key(self.job, r, level, j, attempt), json_to_bytes({"at": at})
        )

    def unrequest(self, r: int, level: int, j: int, attempt: int) -> None:
        """Take back a marker whose request was never published (the bus refused it)."""
        self.store.delete(request_key(self.job, r, level, j, attempt))

    def requests(self, r: int) -> dict[tuple[int, int], int]:
        """The latest attempt of every node requested (one listing)."""
        prefix = _requests_prefix(self.job, r)
        latest: dict[tuple[int, int], int] = {}
        for key in self.store.list(prefix):
            node, attempt = key[len(prefix) :].split(".")
            level, j = (int(x) for x in node.split("-"))
            latest[(level, j)] = max(latest.get((level, j), 0), int(attempt))
        return latest

    def requested_at(self, r: int, level: int, j: int, attempt: int) -> float | None:
        data = self.store.read(request_key(self.job, r, level, j, attempt))
        return None if data is None else float(json_from_bytes(data)["at"])


def _node_of(rest: str) -> tuple[int, int]:
    level, name = rest.split("/")
    return int(level), int(name.split(".")[0])
