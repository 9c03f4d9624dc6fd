"""Prometheus metrics of one function instance, served as GET /metrics for operators to scrape.

They are in-memory counters per instance and decide nothing (invariant 1 holds: storage stays the
only state that matters; a restart starts them from zero, which Prometheus's rate() expects).
Labels carry only bounded values: HTTP statuses, the platform's event types, a tree node's kind;
never a client or job id, which clients and operators choose without bound."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Histogram, generate_latest

from microfl import events

__all__ = [
    "event_refused",
    "exposition",
    "node_built",
    "published",
    "since",
    "upload",
    "upload_bytes",
    "COMMIT_SECONDS",
    "SEAL_SECONDS",
]

# Seconds from a few milliseconds (a small leaf on a local disk) to minutes (a large model on GCS).
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Event types a label may carry; anything else a publisher sends is counted as "other".
_TYPES = frozenset({*events.TOPICS, events.PING})

UPLOADS = Counter("microfl_uploads", "Update uploads answered, by HTTP status", ["status"])
UPLOAD_BYTES = Counter("microfl_upload_bytes", "Bytes of update bodies received")
FOLDED_UPDATES = Counter("microfl_folded_updates", "Updates folded into a leaf of a round's tree")
FOLDED_VALUES = Counter(
    "microfl_folded_values",
    "Values (tensor elements) folded into leaves; divided by the leaf seconds of "
    "microfl_partial_seconds it is the fold throughput",
)
PARTIAL_SECONDS = Histogram(
    "microfl_partial_seconds",
    "Seconds to build a node of a round's tree (read, check, fold or merge, write), by kind",
    ["kind"],
    buckets=_BUCKETS,
)
SEAL_SECONDS = Histogram(
    "microfl_seal_seconds",
    "Seconds of the finalize call that wrote a round's seal (decision, listing, seal)",
    buckets=_BUCKETS,
)
COMMIT_SECONDS = Histogram(
    "microfl_commit_seconds",
    "Seconds of the finalize call that built a round's model and record",
    buckets=_BUCKETS,
)
EVENTS_PUBLISHED = Counter(
    "microfl_events_published", "Events acknowledged by the bus, by type", ["type"]
)
EVENTS_REFUSED = Counter(
    "microfl_events_dead_lettered",
    "Events answered with a 4xx the delivery does not retry (they go to the dead-letter sink)",
    ["type", "status"],
)

# Knative's eventing dispatcher retries these 4xx; any other 4xx is dead-lettered (DESIGN.md).
_RETRIED_4XX = frozenset({404, 408, 409, 429})


def _type(event_type: Any) -> str:
    return event_type if event_type in _TYPES else "other"


def upload(status: int) -> None:
    UPLOADS.labels(str(status)).inc()


def upload_bytes(n: int) -> None:
    UPLOAD_BYTES.inc(n)


def since(histogram: Histogram, start: float) -> None:
    """Observe the seconds since start (a time.perf_counter() reading)."""
    histogram.observe(time.perf_counter() - start)


def node_built(level: int, base: Mapping[str, Any], included: Sequence[Any], start: float) -> None:
    """A node of the summing tree was built from start on; a leaf counts what it folded (each
    included update has base's size)."""
    kind = "leaf" if level == 0 else "inner"
    since(PARTIAL_SECONDS.labels(kind), start)
    if level == 0:
        FOLDED_UPDATES.inc(len(included))
        FOLDED_VALUES.inc(len(included) * sum(int(a.size) for a in base.values()))


def published(types: Sequence[str]) -> None:
    for t in types:
        EVENTS_PUBLISHED.labels(_type(t)).inc()


def event_refused(event_type: Any, status: int) -> None:
    """Count an event answered with status if the delivery will dead-letter it."""
    if 400 <= status < 500 and status not in _RETRIED_4XX:
        EVENTS_REFUSED.labels(_type(event_type), str(status)).inc()


def exposition() -> tuple[bytes, int, dict[str, str]]:
    """The answer to GET /metrics: this process's metrics (process_* included) as text."""
    return generate_latest(REGISTRY), 200, {"Content-Type": CONTENT_TYPE_LATEST}
