"""The EventBus contract, run against MemoryBus, KafkaBus on the real broker and PubSubBus on the
emulator, as tests/test_store.py does for the object store: what the functions rely on when they
publish, read back the way a KafkaSource or a push subscription would see it."""

from __future__ import annotations

import os
import signal
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from google.cloud import pubsub_v1

from microfl import events
from microfl.bus import EventBus, KafkaBus, MemoryBus, PubSubBus
from microfl.errors import BusUnavailable
from microfl.local.kafka import KafkaCluster, ensure_topics
from microfl.local.procs import HOST, free_port
from microfl.local.pubsub import PubSubEmulator, emulator_env
from microfl.serde import Event, KafkaRecord, event_from_http, event_from_kafka

TOPIC_NAMES = sorted(set(events.TOPICS.values()))
DOWN_TIMEOUT = 2.0  # the bus timeout while the transport is down: keeps those tests short
Received = list[tuple[str | None, Event]]  # (key, event) in arrival order


@dataclass
class Harness:
    """A bus and a reader of its transport. `stored(topic, keys)` reads what the transport holds
    for those keys *now* (nothing published later than the call); `pids` are the processes to
    SIGSTOP to take the transport down ([] if we do not own them)."""

    name: str
    bus: EventBus
    pids: list[int] = field(default_factory=list)

    def stored(self, topic: str, keys: set[str], expected: int) -> Received:
        raise NotImplementedError

    def bus_with_timeout(self, timeout: float) -> EventBus:
        raise NotImplementedError


class MemoryHarness(Harness):
    def stored(self, topic: str, keys: set[str], expected: int) -> Received:
        assert isinstance(self.bus, MemoryBus)
        return [(k, e) for t, e, k in self.bus.events if t == topic and k in keys]


class KafkaHarness(Harness):
    """Reads each partition up to its high watermark at the time of the call: a record below it
    is replicated to the in-sync replicas, which is what acks=all promised."""

    def __init__(self, bootstrap: str, pids: list[int]) -> None:
        super().__init__("kafka", KafkaBus(bootstrap), pids)
        self.bootstrap = bootstrap
        self.consumer = Consumer(
            {
                "bootstrap.servers": bootstrap,
                "group.id": "bus-contract",
                "enable.auto.commit": False,
            }
        )
        self.start: dict[tuple[str, int], int] = {}

    def _end(self, topic: str, partition: int) -> int:
        """The high watermark; a topic just made may not have a leader for a moment."""
        deadline = time.monotonic() + 20
        while True:
            try:
                tp = TopicPartition(topic, partition)
                return int(self.consumer.get_watermark_offsets(tp, timeout=10)[1])
            except KafkaException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def mark(self) -> None:
        """Remember where each partition ends, so that `stored` reads only what came after."""
        for topic in TOPIC_NAMES:
            for p in self.consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                self.start[(topic, p)] = self._end(topic, p)

    def stored(self, topic: str, keys: set[str], expected: int) -> Received:
        ends = {p: self._end(topic, p) for (t, p) in self.start if t == topic}
        wanted = {p: end for p, end in ends.items() if end > self.start[(topic, p)]}
        self.consumer.assign([TopicPartition(topic, p, self.start[(topic, p)]) for p in wanted])
        records: dict[int, list[Any]] = {p: [] for p in wanted}
        deadline = time.monotonic() + 20
        while (
            any(not records[p] or records[p][-1].offset() < wanted[p] - 1 for p in wanted)
            and time.monotonic() < deadline
        ):
            for msg in self.consumer.consume(100, timeout=0.5):
                if msg.error() is None and msg.offset() < wanted[msg.partition()]:
                    records[msg.partition()].append(msg)
        self.consumer.unassign()
        got: Received = []
        # Order across partitions is not part of the contract; order within a key is.
        for p in sorted(records):
            for msg in records[p]:
                record = KafkaRecord(tuple(msg.headers() or ()), msg.key(), msg.value())
                key = record.key.decode() if record.key is not None else None
                if key in keys:
                    got.append((key, event_from_kafka(record)))
        return got

    def bus_with_timeout(self, timeout: float) -> EventBus:
        return KafkaBus(self.bootstrap, timeout=timeout)

    def close(self) -> None:
        self.consumer.close()


class PubSubHarness(Harness):
    """A project of its own on the emulator, with the topics and an ordered pull subscription to
    each, made before anything is published (Pub/Sub keeps nothing for a topic without one)."""

    def __init__(self, host: str, pids: list[int]) -> None:
        self.host = host
        self.project = f"bus-contract-{uuid.uuid4().hex[:8]}"
        with emulator_env(host):
            super().__init__("pubsub", PubSubBus(self.project), pids)
            self.bus._get()  # type: ignore[attr-defined]  # the client binds to the emulator now
            publisher = pubsub_v1.PublisherClient()
            self.subscriber = pubsub_v1.SubscriberClient()
        for topic in TOPIC_NAMES:
            publisher.create_topic(name=publisher.topic_path(self.project, topic))
            self.subscriber.create_subscription(
                request={
                    "name": self._subscription(topic),
                    "topic": publisher.topic_path(self.project, topic),
                    "enable_message_ordering": True,
                }
            )
        publisher.transport.close()

    def _subscription(self, topic: str) -> str:
        return str(self.subscriber.subscription_path(self.project, f"probe-{topic}"))

    def stored(self, topic: str, keys: set[str], expected: int) -> Received:
        got: Received = []
        deadline = time.monotonic() + 20
        while len(got) < expected and time.monotonic() < deadline:
            pulled = self.subscriber.pull(
                request={"subscription": self._subscription(topic), "max_messages": 100},
                timeout=5,
            ).received_messages
            for item in pulled:
                message = item.message
                if message.ordering_key in keys:
                    event = event_from_http(dict(message.attributes), message.data)
                    got.append((message.ordering_key, event))
            if pulled:
                self.subscriber.acknowledge(
                    request={
                        "subscription": self._subscription(topic),
                        "ack_ids": [i.ack_id for i in pulled],
                    }
                )
        return got

    def bus_with_timeout(self, timeout: float) -> EventBus:
        bus = PubSubBus(self.project, timeout=timeout)
        with emulator_env(self.host):
            bus._get()
        return bus

    def close(self) -> None:
        self.subscriber.close()


@pytest.fixture(scope="module")
def kafka_harness(kafka: SimpleNamespace | KafkaCluster) -> Iterator[KafkaHarness]:
    ensure_topics(kafka.bootstrap)
    pids = kafka.pids() if isinstance(kafka, KafkaCluster) else []
    harness = KafkaHarness(kafka.bootstrap, pids)
    yield harness
    harness.close()


@pytest.fixture(scope="module")
def pubsub_harness(pubsub: PubSubEmulator) -> Iterator[PubSubHarness]:
    assert pubsub.proc is not None
    harness = PubSubHarness(pubsub.host, [pubsub.proc.pid])
    yield harness
    harness.close()


@pytest.fixture(params=["memory", "kafka", "pubsub"])
def harness(request: pytest.FixtureRequest) -> Harness:
    if request.param == "memory":
        return MemoryHarness("memory", MemoryBus())
    found: Harness = request.getfixturevalue(f"{request.param}_harness")
    if isinstance(found, KafkaHarness):
        found.mark()
    return found


@pytest.fixture(params=["kafka", "pubsub"])
def real(request: pytest.FixtureRequest) -> Harness:
    """A harness whose transport can go down (MemoryBus has none)."""
    found: Harness = request.getfixturevalue(f"{request.param}_harness")
    if isinstance(found, KafkaHarness):
        found.mark()
    return found


def new_job() -> str:
    return f"job-{uuid.uuid4().hex[:10]}"


def one_of_each(job: str, r: int = 1) -> list[Event]:
    return [
        events.update_accepted(job, r, "client-a"),
        events.partial_requested(job, r, 0, 0),
        events.partial_ready(job, r, 0, 0),
        events.round_committed(job, r),
    ]


@contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """The transport's processes frozen (SIGSTOP): it accepts connections and answers nothing,
    as a hung broker does; SIGCONT afterwards, whatever happens."""
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


class TestEventBus:
    def test_each_event_lands_on_the_topic_of_its_type(self, harness: Harness) -> None:
        job = new_job()
        sent = one_of_each(job)
        harness.bus.publish(sent, key=job)
        for topic in TOPIC_NAMES:
            expected = [e for e in sent if events.topic_of(e) == topic]
            got = harness.stored(topic, {job}, len(expected))
            assert [e for _, e in got] == expected, topic

    def test_events_arrive_in_the_cloudevents_binding_unchanged(self, harness: Harness) -> None:
        """Every attribute, extension and the JSON data survive the trip, keyed by the job."""
        job = new_job()
        event = Event(
            events.UPDATE_ACCEPTED,
            f"/microfl/jobs/{job}",
            f"{job}/3/update/c",
            {"job": job, "round": 3, "client": "c", "text": "ünïcödé", "nested": {"x": [1.5]}},
            "rounds/3/updates/c",
            {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        )
        harness.bus.publish([event], key=job)
        assert harness.stored(events.TOPICS[event.type], {job}, 1) == [(job, event)]

    def test_all_events_are_stored_when_publish_returns(self, harness: Harness) -> None:
        """No waiting: what publish returned for is there for the next reader."""
        job = new_job()
        sent = [events.update_accepted(job, 1, f"c{i:03}") for i in range(40)]
        harness.bus.publish(sent, key=job)
        assert [e for _, e in harness.stored("microfl.finalize", {job}, len(sent))] == sent

    def test_order_is_kept_per_key_across_calls(self, harness: Harness) -> None:
        jobs = [new_job() for _ in range(3)]
        sent: dict[str, list[Event]] = {job: [] for job in jobs}
        for r in range(1, 4):
            for job in jobs:
                batch = [events.update_accepted(job, r, f"c{i}") for i in range(5)]
                batch.append(events.partial_ready(job, r, 0, 0))
                harness.bus.publish(batch, key=job)
                sent[job] += batch
        got = harness.stored("microfl.finalize", set(jobs), sum(map(len, sent.values())))
        for job in jobs:
            assert [e for k, e in got if k == job] == sent[job], job

    def test_connecting_first_changes_nothing_of_what_is_stored(self, harness: Harness) -> None:
        """connect() (an instance's start) may come any number of times before publishing."""
        job = new_job()
        harness.bus.connect()
        harness.bus.connect()
        harness.bus.publish([events.update_accepted(job, 1, "c")], key=job)
        assert [e for _, e in harness.stored("microfl.finalize", {job}, 1)] == [
            events.update_accepted(job, 1, "c")
        ]

    def test_publishing_nothing_is_a_no_op(self, harness: Harness) -> None:
        job = new_job()
        harness.bus.publish([], key=job)
        harness.bus.publish([events.round_committed(job, 1)], key=job)
        assert len(harness.stored("microfl.rounds", {job}, 1)) == 1


class TestTransportDown:
    """BusUnavailable, in bounded time, when the transport does not answer; and the same bus
    works again once it is back, which is what the function's retry (a 5xx) relies on."""

    def test_nothing_listening_is_bus_unavailable(
        self, real: Harness, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        address = f"{HOST}:{free_port()}"
        if isinstance(real, KafkaHarness):
            bus: EventBus = KafkaBus(address, timeout=DOWN_TIMEOUT)
        else:
            monkeypatch.setenv("PUBSUB_EMULATOR_HOST", address)
            bus = PubSubBus("nowhere", timeout=DOWN_TIMEOUT)
        job = new_job()
        t0 = time.monotonic()
        with pytest.raises(BusUnavailable, match="did not acknowledge"):
            bus.publish(one_of_each(job), key=job)
        assert time.monotonic() - t0 < 4 * DOWN_TIMEOUT + 5

    def test_frozen_transport_is_bus_unavailable_then_the_retry_succeeds(
        self, real: Harness
    ) -> None:
        if not real.pids:
            pytest.skip("an external cluster (MICROFL_KAFKA_BOOTSTRAP) cannot be frozen here")
        bus = real.bus_with_timeout(DOWN_TIMEOUT)
        job = new_job()
        bus.publish([events.update_accepted(job, 1, "before")], key=job)  # connected and warm
        with stopped(real.pids):
            t0 = time.monotonic()
            with pytest.raises(BusUnavailable, match="did not acknowledge"):
                bus.publish([events.update_accepted(job, 1, "during")], key=job)
            assert time.monotonic() - t0 < 4 * DOWN_TIMEOUT + 5
        retry = [events.update_accepted(job, 1, "during"), events.update_accepted(job, 1, "after")]
        deadline = time.monotonic() + 30
        while True:  # the transport needs a moment to answer again after SIGCONT
            try:
                bus.publish(retry, key=job)
                break
            except BusUnavailable:
                if time.monotonic() > deadline:
                    raise
        got: list[str] = []
        while "after" not in got and time.monotonic() < deadline + 20:
            got += [e.data["client"] for _, e in real.stored("microfl.finalize", {job}, 1)]
        # At least once: the frozen attempt may have been stored after all, before the retry.
        assert got[0] == "before" and got[-2:] == ["during", "after"], got


def test_an_instance_is_ready_before_its_first_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """handlers.warm, which main.py calls before the server forks its serving process: the
    aggregate's fold loops are loaded, and the forked process connects its bus at once (before,
    version 1 of every job waited ~0.5 s per cold producer and ~1.5 s for numba's loops)."""
    from microfl import foldloops, handlers
    from microfl.backends import Backends
    from microfl.store import FileStore

    class Counting(MemoryBus):
        connected = 0

        def connect(self) -> None:
            self.connected += 1

    hooks: list[Callable[[], None]] = []
    monkeypatch.setenv("MICROFL_STORE", FileStore(tmp_path).url)
    monkeypatch.setattr(os, "register_at_fork", lambda after_in_child: hooks.append(after_in_child))
    bus = Counting()
    handlers.set_backends(Backends(FileStore(tmp_path), bus))
    try:
        foldloops.kernel.cache_clear()
        handlers.warm("console")
        assert not hooks and foldloops.kernel.cache_info().currsize == 0
        handlers.warm("aggregate")
        assert foldloops.kernel.cache_info().currsize == 2  # plain and delta float loops
        assert len(hooks) == 1 and bus.connected == 0  # nothing connected before the fork
        hooks[0]()  # in the forked serving process
        for thread in threading.enumerate():
            if thread.name == "microfl-connect":
                thread.join(10)
        assert bus.connected == 1
    finally:
        handlers.set_backends(None)
