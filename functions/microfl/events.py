"""The platform's events: versioned types, deterministic ids, and the topic each one travels on.

Ids are derived from what the event is about, so a re-emitted event after a crash is the same
event; handlers are idempotent anyway, because delivery is at least once. A type's version goes
up when its data changes in a way its old consumers would misread (partial.* v2: tree nodes
instead of the seal's chunks); added fields keep the version (update.accepted's slot)."""

from __future__ import annotations

from microfl.serde import Event

__all__ = [
    "PARTIAL_READY",
    "PARTIAL_REQUESTED",
    "PING",
    "ROUND_COMMITTED",
    "TOPICS",
    "UPDATE_ACCEPTED",
    "partial_ready",
    "partial_requested",
    "round_committed",
    "topic_of",
    "update_accepted",
]

UPDATE_ACCEPTED = "io.microfl.update.accepted.v1"
PARTIAL_REQUESTED = "io.microfl.partial.requested.v2"
PARTIAL_READY = "io.microfl.partial.ready.v2"
ROUND_COMMITTED = "io.microfl.round.committed.v1"
PING = "dev.knative.sources.ping"  # the scheduled source (round deadlines, recovery sweep)

# One topic per consuming function (a KafkaSource cannot filter by type), one for observers.
TOPICS = {
    PARTIAL_REQUESTED: "microfl.aggregate",
    UPDATE_ACCEPTED: "microfl.finalize",
    PARTIAL_READY: "microfl.finalize",
    ROUND_COMMITTED: "microfl.rounds",
}


def topic_of(event: Event) -> str:
    return TOPICS[event.type]


def _event(kind: str, job: str, r: int, what: str, subject: str, **data: object) -> Event:
    """An event about round r of a job; its id names what it is about."""
    return Event(
        kind,
        f"/microfl/jobs/{job}",
        f"{job}/{r}/{what}",
        {"job": job, "round": r, **data},
        f"rounds/{r}{subject}",
    )


def update_accepted(job: str, r: int, client: str, slot: int | None = None) -> Event:
    """The update holds tree position `slot` of round r (None: it has none, as before slots)."""
    extra = {} if slot is None else {"slot": slot}
    return _event(
        UPDATE_ACCEPTED, job, r, f"update/{client}", f"/updates/{client}", client=client, **extra
    )


def partial_requested(job: str, r: int, level: int, node: int, attempt: int = 0) -> Event:
    """Build node `node` of level `level` of round r's tree (attempt > 0: the sweep's resend)."""
    what = f"partial-requested/{level}-{node}" + (f".{attempt}" if attempt else "")
    return _event(PARTIAL_REQUESTED, job, r, what, f"/nodes/{level}/{node}", level=level, node=node)


def partial_ready(job: str, r: int, level: int, node: int) -> Event:
    return _event(
        PARTIAL_READY,
        job,
        r,
        f"partial-ready/{level}-{node}",
        f"/nodes/{level}/{node}",
        level=level,
        node=node,
    )


def round_committed(job: str, r: int) -> Event:
    return _event(ROUND_COMMITTED, job, r, "committed", "", model_version=r)
