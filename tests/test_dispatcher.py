"""The local KafkaSource dispatcher against the real broker and a real HTTP sink: retries and
backoff, dead-lettering, committed offsets, ordering, CloudEvent conversion, initial offset."""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from fl import eventually
from kafka_topics import consume
from microfl.local.dispatcher import Delivery, Dispatcher, KafkaSource, parse_duration

WAIT = 20.0  # seconds any single expectation may take


@dataclass
class Request:
    at: float
    headers: dict[str, str]
    body: bytes

    @property
    def partition(self) -> str:
        return self.headers["ce-subject"].split("#")[0]


@dataclass
class Sink:
    """Answers scripted statuses in request order (then `default`), records every request and
    how many requests of one partition (from ce-subject) were in progress at once."""

    script: list[int] = field(default_factory=list)
    default: int = 200
    delay: float = 0.0
    requests: list[Request] = field(default_factory=list)
    max_concurrency: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    url: str = ""
    _busy: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, headers: dict[str, str], body: bytes) -> int:
        request = Request(time.monotonic(), headers, body)
        key = request.partition if "ce-subject" in headers else ""
        with self._lock:
            self.requests.append(request)
            status = self.script.pop(0) if self.script else self.default
            self._busy[key] += 1
            self.max_concurrency[key] = max(self.max_concurrency[key], self._busy[key])
        time.sleep(self.delay)
        with self._lock:
            self._busy[key] -= 1
        return status


@pytest.fixture
def make_sink() -> Iterator[Callable[..., Sink]]:
    servers: list[ThreadingHTTPServer] = []

    def make(**kwargs: Any) -> Sink:
        sink = Sink(**kwargs)

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                status = sink.handle({k.lower(): v for k, v in self.headers.items()}, body)
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args: Any) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        sink.url = f"http://127.0.0.1:{server.server_address[1]}/"
        return sink

    yield make
    for server in servers:
        server.shutdown()
        server.server_close()


def new_topic(bootstrap: str, partitions: int = 1) -> str:
    name = f"d-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, num_partitions=partitions, replication_factor=1)])
    futures[name].result(timeout=30)
    return name


Record = tuple[bytes | None, bytes, list[tuple[str, str | bytes | None]], int]


def produce(bootstrap: str, topic: str, records: list[Record]) -> None:
    producer = Producer(
        {"bootstrap.servers": bootstrap, "enable.idempotence": True, "acks": "all", "linger.ms": 1}
    )
    for key, value, headers, partition in records:
        producer.produce(topic, key=key, value=value, headers=headers, partition=partition)
    assert producer.flush(30) == 0


def source(bootstrap: str, topic: str, sink: Sink, **kwargs: Any) -> KafkaSource:
    delivery = kwargs.pop("delivery", Delivery(retry=3, backoff_delay=0.05, timeout=5))
    return KafkaSource(
        bootstrap=bootstrap,
        topics=[topic],
        group=f"g-{uuid.uuid4().hex[:8]}",
        sink=sink.url,
        delivery=delivery,
        **kwargs,
    )


def test_503_then_200_is_retried_after_the_exponential_backoff(kafka: Any, make_sink: Any) -> None:
    sink = make_sink(script=[503])
    topic = new_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, [(b"k", b"v", [], 0)])
    delivery = Delivery(retry=3, backoff_policy="exponential", backoff_delay=0.1, timeout=5)
    with Dispatcher(source(kafka.bootstrap, topic, sink, delivery=delivery)) as dispatcher:
        eventually(lambda: dispatcher.counters.delivered == 1, "delivery after one retry")
    first, second = sink.requests
    assert first.headers["ce-id"] == second.headers["ce-id"] == "partition:0/offset:0"
    gap = second.at - first.at
    assert delivery.backoff(1) == pytest.approx(0.2)
    assert delivery.backoff(1) <= gap < delivery.backoff(1) + 1.0
    assert (dispatcher.counters.retried, dispatcher.counters.dead_lettered) == (1, 0)


def test_400_is_dead_lettered_at_once_with_the_error_headers(kafka: Any, make_sink: Any) -> None:
    sink = make_sink(script=[400])
    topic, dlq = new_topic(kafka.bootstrap), new_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, [(b"key-1", b'{"x": 1}', [("trace", b"t-1")], 0)])
    delivery = Delivery(retry=3, backoff_delay=0.05, timeout=5, dead_letter_topic=dlq)
    with Dispatcher(source(kafka.bootstrap, topic, sink, delivery=delivery)) as dispatcher:
        eventually(lambda: dispatcher.counters.dead_lettered == 1, "dead-lettering")
    assert len(sink.requests) == 1
    assert (dispatcher.counters.retried, dispatcher.counters.delivered) == (0, 0)
    [record] = consume(kafka.bootstrap, dlq, 1, WAIT)
    assert (record.key(), record.value()) == (b"key-1", b'{"x": 1}')
    headers = dict(record.headers())
    assert headers["trace"] == b"t-1"
    assert headers["kne-dispatcher-error-code"] == b"400"
    assert headers["kne-dispatcher-error-dest"] == sink.url.encode()


def test_409_and_429_are_retried(kafka: Any, make_sink: Any) -> None:
    sink = make_sink(script=[409, 429])
    topic = new_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, [(None, b"v", [], 0)])
    with Dispatcher(source(kafka.bootstrap, topic, sink)) as dispatcher:
        eventually(lambda: dispatcher.counters.delivered == 1, "delivery after two retries")
    assert len(sink.requests) == 3
    assert (dispatcher.counters.retried, dispatcher.counters.dead_lettered) == (2, 0)


def test_exhausted_retries_dead_letter_and_commit_the_offset(kafka: Any, make_sink: Any) -> None:
    sink = make_sink(default=500)
    topic, dlq = new_topic(kafka.bootstrap), new_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, [(b"a", b"doomed", [], 0)])
    delivery = Delivery(
        retry=2, backoff_policy="linear", backoff_delay=0.05, timeout=5, dead_letter_topic=dlq
    )
    first = source(kafka.bootstrap, topic, sink, delivery=delivery)
    with Dispatcher(first) as dispatcher:
        eventually(lambda: dispatcher.counters.dead_lettered == 1, "dead-lettering")
    assert len(sink.requests) == 3 and dispatcher.counters.retried == 2
    [record] = consume(kafka.bootstrap, dlq, 1, WAIT)
    assert record.value() == b"doomed"
    assert dict(record.headers())["kne-dispatcher-error-code"] == b"500"

    probe = Consumer({"bootstrap.servers": kafka.bootstrap, "group.id": first.group})
    [committed] = probe.committed([TopicPartition(topic, 0)], timeout=10)
    probe.close()
    assert committed.offset == 1

    sink.default, seen = 200, len(sink.requests)
    with Dispatcher(
        KafkaSource(kafka.bootstrap, [topic], first.group, sink.url, delivery)
    ) as again:
        produce(kafka.bootstrap, topic, [(b"b", b"fine", [], 0)])
        eventually(lambda: again.counters.delivered == 1, "the next record")
    assert [r.body for r in sink.requests[seen:]] == [b"fine"]


@pytest.mark.parametrize("ordering", ["ordered", "unordered"])
def test_ordering_bounds_records_in_flight_per_partition(
    kafka: Any, make_sink: Any, ordering: str
) -> None:
    sink = make_sink(delay=0.05)
    topic = new_topic(kafka.bootstrap, partitions=2)
    produce(
        kafka.bootstrap,
        topic,
        [(None, f"{p}-{i}".encode(), [], p) for p in (0, 1) for i in range(10)],
    )
    with Dispatcher(source(kafka.bootstrap, topic, sink, ordering=ordering)) as dispatcher:
        eventually(lambda: dispatcher.counters.delivered == 20, "all 20 records")
    assert set(sink.max_concurrency) == {"partition:0", "partition:1"}
    if ordering == "ordered":
        assert max(sink.max_concurrency.values()) == 1
        for p in (0, 1):
            bodies = [r.body for r in sink.requests if r.partition == f"partition:{p}"]
            assert bodies == [f"{p}-{i}".encode() for i in range(10)]
    else:
        assert max(sink.max_concurrency.values()) > 1


def test_cloudevents_pass_through_and_plain_records_are_wrapped(kafka: Any, make_sink: Any) -> None:
    sink = make_sink()
    topic = new_topic(kafka.bootstrap)
    ce = {
        "ce_specversion": "1.0",
        "ce_id": "u-17",
        "ce_type": "io.microfl.update.accepted.v1",
        "ce_source": "/microfl/ingest",
        "ce_subject": "jobs/j1/rounds/3",
        "ce_time": "2025-01-02T03:04:05Z",
        "ce_microfljob": "j1",
        "content-type": "application/json",
    }
    produce(
        kafka.bootstrap,
        topic,
        [
            (b"ignored", b'{"client": "c1"}', [(k, v.encode()) for k, v in ce.items()], 0),
            (b"client-7", b"plain", [], 0),
            (b"\xff\x00", b"binary key", [], 0),
        ],
    )
    disp_source = source(kafka.bootstrap, topic, sink)
    with Dispatcher(disp_source) as dispatcher:
        eventually(lambda: dispatcher.counters.delivered == 3, "three records")
    event, plain, binary = sink.requests
    forwarded = {k: v for k, v in event.headers.items() if k.startswith("ce-")}
    assert forwarded == {f"ce-{k[3:]}": v for k, v in ce.items() if k.startswith("ce_")}
    assert event.headers["content-type"] == "application/json"
    assert event.body == b'{"client": "c1"}'
    assert {k: v for k, v in plain.headers.items() if k.startswith("ce-")} == {
        "ce-specversion": "1.0",
        "ce-type": "dev.knative.kafka.event",
        "ce-id": "partition:0/offset:1",
        "ce-source": f"/apis/v1/namespaces/default/kafkasources/{disp_source.group}#{topic}",
        "ce-subject": "partition:0#1",
        "ce-key": "client-7",
    }
    assert plain.body == b"plain"
    assert binary.headers["ce-key"] == "/wA="  # not UTF-8: base64


def test_initial_offset_latest_skips_earlier_records(kafka: Any, make_sink: Any) -> None:
    sink = make_sink()
    topic = new_topic(kafka.bootstrap)
    produce(kafka.bootstrap, topic, [(None, f"old-{i}".encode(), [], 0) for i in range(3)])
    with Dispatcher(source(kafka.bootstrap, topic, sink, initial_offset="latest")) as dispatcher:
        produce(kafka.bootstrap, topic, [(None, f"new-{i}".encode(), [], 0) for i in range(2)])
        eventually(lambda: dispatcher.counters.delivered == 2, "the two new records")
    # One ordered partition: an old record, had it been sent, would have come first.
    assert [r.body for r in sink.requests] == [b"new-0", b"new-1"]


def test_start_returns_once_the_group_has_assigned_the_partitions(
    kafka: Any, make_sink: Any
) -> None:
    """Like a KafkaSource turning ready: a platform's first events wait for no group join."""
    sink = make_sink()
    topic = new_topic(kafka.bootstrap, partitions=3)
    src = source(kafka.bootstrap, topic, sink)
    admin = AdminClient({"bootstrap.servers": kafka.bootstrap})
    with Dispatcher(src):
        group = admin.describe_consumer_groups([src.group])[src.group].result(timeout=10)
        assigned = {tp.partition for m in group.members for tp in m.assignment.topic_partitions}
        assert (group.state.name, assigned) == ("STABLE", {0, 1, 2})


def test_durations_and_backoff_follow_knative() -> None:
    assert [parse_duration(d) for d in ("PT0.5S", "PT2M", "PT1H30M", "P1D", "P1DT1S")] == [
        0.5,
        120.0,
        5400.0,
        86400.0,
        86401.0,
    ]
    for bad in ("", "P", "PT", "P1DT", "0.5S", "PT1.5", "P1Y", "soon"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert [Delivery(backoff_delay=0.5).backoff(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    linear = Delivery(backoff_policy="linear", backoff_delay=0.5)
    assert [linear.backoff(n) for n in (1, 2, 3)] == [0.5, 1.0, 1.5]
