"""The platform's events: versioned types, deterministic ids, and the topic each one travels on.

Ids are derived from what the event is about, so a re-emitted event after a crash is the same
event; handlers are idempotent anyway, because delivery is at least once."""

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
PARTIAL_REQUESTED = "io.microfl.partial.requested.v1"
PARTIAL_READY = "io.microfl.partial.ready.v1"
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


def _source(job: str) -> str:
    return f"/microfl/jobs/{job}"


def update_accepted(job: str, r: int, client: str) -> Event:
    return Event(
        UPDATE_ACCEPTED,
        _source(job),
        f"{job}/{r}/update/{client}",
        {"job": job, "round": r, "client": client},
        f"rounds/{r}/updates/{client}",
    )


def partial_requested(job: str, r: int, chunk: int) -> Event:
    return Event(
        PARTIAL_REQUESTED,
        _source(job),
        f"{job}/{r}/partial-requested/{chunk}",
        {"job": job, "round": r, "chunk": chunk},
        f"rounds/{r}/partials/{chunk}",
    )


def partial_ready(job: str, r: int, chunk: int) -> Event:
    return Event(
        PARTIAL_READY,
        _source(job),
        f"{job}/{r}/partial-ready/{chunk}",
        {"job": job, "round": r, "chunk": chunk},
        f"rounds/{r}/partials/{chunk}",
    )


def round_committed(job: str, r: int) -> Event:
    return Event(
        ROUND_COMMITTED,
        _source(job),
        f"{job}/{r}/committed",
        {"job": job, "round": r, "model_version": r},
        f"rounds/{r}",
    )
