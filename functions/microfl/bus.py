"""The event bus the functions publish to: one interface, two transports chosen by configuration
(MICROFL_BUS): Kafka, the default, and Google Cloud Pub/Sub. The functions publish the same events
either way; what consumes them is the platform's business (KafkaSources or push subscriptions)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

from microfl import prometheus
from microfl.errors import BusUnavailable
from microfl.events import topic_of
from microfl.serde import Event, event_to_http, event_to_kafka

__all__ = ["EventBus", "KafkaBus", "MemoryBus", "PubSubBus"]


class EventBus(ABC):
    @abstractmethod
    def publish(self, events: Sequence[Event], key: str) -> None:
        """Durably publish events (all acknowledged on return) or raise BusUnavailable."""

    def connect(self) -> None:  # noqa: B027 (optional: most buses have nothing to build)
        """Build the client now rather than at the first publish (an instance's start)."""


class KafkaBus(EventBus):
    """Idempotent producer with acks=all; the producer is built on first use."""

    def __init__(self, bootstrap: str, timeout: float = 15.0) -> None:
        self.bootstrap = bootstrap
        self.timeout = timeout
        self._producer: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        from confluent_kafka import Producer

        with self._lock:
            if self._producer is None:
                self._producer = Producer(
                    {
                        "bootstrap.servers": self.bootstrap,
                        "enable.idempotence": True,
                        "acks": "all",
                        "linger.ms": 2,
                        "message.timeout.ms": int(self.timeout * 1000),
                        "logger": logging.getLogger("microfl.bus"),  # JSON lines, not raw stderr
                    }
                )
            return self._producer

    def connect(self) -> None:
        """The producer fetches its idempotent producer id in the background (librdkafka
        retries after 0.5 s when no broker is connected yet): before the first publish, not
        in it."""
        self._get()

    def publish(self, events: Sequence[Event], key: str) -> None:
        producer = self._get()
        errors: list[str] = []
        for event in events:
            record = event_to_kafka(event, key)
            try:
                producer.produce(
                    topic_of(event),
                    value=record.value,
                    key=record.key,
                    headers=list(record.headers),
                    on_delivery=lambda err, _msg: errors.extend([str(err)] if err else []),
                )
            except BufferError as exc:
                raise BusUnavailable(f"Kafka producer queue is full: {exc}") from exc
            producer.poll(0)
        left = producer.flush(self.timeout)
        if left or errors:
            raise BusUnavailable(
                f"Kafka at {self.bootstrap} did not acknowledge "
                f"{left + len(errors)} event(s): {'; '.join(errors[:3])}"
            )
        prometheus.published([e.type for e in events])


class PubSubBus(EventBus):
    """Pub/Sub publisher in the CloudEvents Pub/Sub binding: the event's data is the message,
    its attributes are ce-* plus Content-Type, exactly the headers of HTTP binary mode, so a push
    subscription without wrapper delivers the very request a KafkaSource would. The event key
    (the job) is the ordering key, which keeps a job's events in order where the subscription
    asks for it, as Kafka's partitions do. PUBSUB_EMULATOR_HOST points the client at an emulator."""

    def __init__(self, project: str, timeout: float = 15.0) -> None:
        self.project = project
        self.timeout = timeout
        self._publisher: Any = None
        self._lock = threading.Lock()

    def _get(self) -> Any:
        from google.cloud import pubsub_v1

        with self._lock:
            if self._publisher is None:
                self._publisher = pubsub_v1.PublisherClient(
                    publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
                )
            return self._publisher

    def connect(self) -> None:
        self._get()

    def publish(self, events: Sequence[Event], key: str) -> None:
        publisher = self._get()
        sent = []
        for event in events:
            headers, body = event_to_http(event)
            topic = publisher.topic_path(self.project, topic_of(event))
            future = publisher.publish(
                topic, body, ordering_key=key, timeout=self.timeout, **headers
            )
            sent.append((topic, future))
        errors: list[str] = []
        # One deadline for the whole call, not one per event: n events to a dead emulator would
        # otherwise take n times as long to give up.
        deadline = time.monotonic() + self.timeout + 5
        for topic, future in sent:
            try:
                future.result(timeout=max(0.0, deadline - time.monotonic()))
            except Exception as exc:  # the client raises many kinds; all mean "not published"
                errors.append(f"{topic}: {type(exc).__name__}: {exc}")
                # A failed publish pauses its ordering key (a timed-out one does not); the
                # caller's retry resends everything, so let the key go on.
                with contextlib.suppress(RuntimeError):
                    publisher.resume_publish(topic, key)
        if errors:
            raise BusUnavailable(
                f"Pub/Sub did not acknowledge {len(errors)} event(s): {'; '.join(errors[:3])}"
            )
        prometheus.published([e.type for e in events])


class MemoryBus(EventBus):
    """Collects events in a list: for unit tests that drive the functions by hand."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Event, str]] = []

    def publish(self, events: Sequence[Event], key: str) -> None:
        self.events.extend((topic_of(e), e, key) for e in events)
        prometheus.published([e.type for e in events])
