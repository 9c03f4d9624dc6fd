"""The local stand-in for Knative's KafkaSource: Kafka records in, CloudEvents over HTTP POST out.

It reproduces what functions can observe of eventing-kafka-broker's dispatcher (DESIGN.md, "Event
delivery"): retried statuses, backoff, dead-lettering, offset commits, ordering, CloudEvent shape.
Each group member's thread alone touches its Consumer; HTTP attempts run on a worker pool."""

from __future__ import annotations

import base64
import logging
import queue
import re
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from confluent_kafka import Consumer, KafkaException, Message, Producer, TopicPartition

__all__ = [
    "Counters",
    "Delivery",
    "Dispatcher",
    "KafkaSource",
    "http_from_record",
    "parse_duration",
    "post_once",
]

KAFKA_EVENT_TYPE = "dev.knative.kafka.event"
SOURCE_URI = "/apis/v1/namespaces/default/kafkasources/{name}#{topic}"
MAX_IN_FLIGHT = 16  # records posted at once per consumer (unordered), and worker threads
MAX_PENDING = 64  # records buffered per partition before it is paused: memory stays bounded
RETRYABLE = frozenset({404, 408, 409, 429})  # and every 5xx and network error
ERROR_HEADER = "kne-dispatcher-error-"
ERROR_DATA_LIMIT = 1024  # bytes of a failed answer kept for the log and the dead-letter header
DLQ_TIMEOUT = 35.0  # seconds to wait for the dead-letter topic's ack (message.timeout.ms + 5)
_NUM = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile(rf"P(?:{_NUM}W)?(?:{_NUM}D)?(?:T(?:{_NUM}H)?(?:{_NUM}M)?(?:{_NUM}S)?)?")
_UNITS = (604800.0, 86400.0, 3600.0, 60.0, 1.0)
_PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))


def parse_duration(iso: str) -> float:
    """Seconds in an ISO-8601 duration (PT0.5S, PT2M, PT1H30M, P1D): Knative's delivery format."""
    text = iso.strip()
    match = _DURATION.fullmatch(text)
    if match is None or text.endswith("T") or not any(match.groups()):
        raise ValueError(
            f"{iso!r} is not an ISO-8601 duration such as PT0.5S, PT2M or P1D "
            "(years and months are not supported)"
        )
    return sum(float(v) * unit for v, unit in zip(match.groups(), _UNITS, strict=True) if v)


@dataclass(frozen=True)
class Delivery:
    """A KafkaSource's `delivery` block, durations in seconds."""

    retry: int = 3
    backoff_policy: str = "exponential"
    backoff_delay: float = 0.2
    timeout: float = 30.0
    dead_letter_topic: str | None = None

    def __post_init__(self) -> None:
        if self.backoff_policy not in ("linear", "exponential"):
            raise ValueError(f"backoff_policy {self.backoff_policy!r}: use linear or exponential")
        if self.retry < 0 or self.backoff_delay < 0 or self.timeout <= 0:
            raise ValueError("retry and backoff_delay must be >= 0 and timeout > 0")

    def backoff(self, n: int) -> float:
        """Seconds before retry n (1-based), as eventing-kafka-broker computes them."""
        if self.backoff_policy == "linear":
            return self.backoff_delay * n
        return self.backoff_delay * 2**n


@dataclass
class KafkaSource:
    """The fields of a KafkaSource the dispatcher acts on; `group` also names the source."""

    bootstrap: str
    topics: list[str]
    group: str
    sink: str
    delivery: Delivery = field(default_factory=Delivery)
    ordering: str = "ordered"
    initial_offset: str = "earliest"
    consumers: int = 1

    def __post_init__(self) -> None:
        if self.ordering not in ("ordered", "unordered"):
            raise ValueError(f"ordering {self.ordering!r}: use ordered or unordered")
        if self.initial_offset not in ("earliest", "latest"):
            raise ValueError(f"initial_offset {self.initial_offset!r}: use earliest or latest")
        if self.consumers < 1 or not self.topics:
            raise ValueError("a KafkaSource needs at least one topic and one consumer")


@dataclass
class Counters:
    """What happened to records so far; updated from worker threads."""

    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    lost: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)


LOG = logging.getLogger("microfl.dispatcher")  # librdkafka's own lines go here too


def _log(message: str) -> None:
    LOG.warning(message)


def _header_pairs(msg: Message) -> list[tuple[str, bytes | None]]:
    raw = msg.headers() or []
    pairs = raw.items() if isinstance(raw, dict) else raw
    return [(k, v.encode() if isinstance(v, str) else v) for k, v in pairs]


def _http_safe(value: str) -> str:
    """Percent-encode only what cannot go in an HTTP header (non-ASCII, control characters)."""
    return quote(value, safe=_PRINTABLE)


def _key_text(key: bytes) -> str:
    try:
        return _http_safe(key.decode("utf-8"))
    except UnicodeDecodeError:
        return base64.b64encode(key).decode("ascii")


def http_from_record(msg: Message, source_name: str) -> tuple[dict[str, str], bytes]:
    """HTTP headers and body of the CloudEvent a record becomes, as KafkaSource sends it."""
    headers = {k: v.decode("utf-8", "replace") for k, v in _header_pairs(msg) if v is not None}
    ctype = next((v for k, v in headers.items() if k.lower() == "content-type"), None)
    if "ce_specversion" in headers:  # Kafka binary mode: forwarded unchanged
        http = {f"ce-{k[3:]}": _http_safe(v) for k, v in headers.items() if k.startswith("ce_")}
    elif ctype is not None and ctype.startswith("application/cloudevents"):
        http = {}  # structured mode: the body already is the whole event
    else:
        p, o = msg.partition(), msg.offset()
        http = {
            "ce-specversion": "1.0",
            "ce-type": KAFKA_EVENT_TYPE,
            "ce-id": f"partition:{p}/offset:{o}",
            "ce-subject": f"partition:{p}#{o}",
            "ce-source": SOURCE_URI.format(name=source_name, topic=msg.topic()),
        }
        key = msg.key()
        if key is not None:
            http["ce-key"] = _key_text(key)
    if ctype is not None:
        http["Content-Type"] = _http_safe(ctype)
    return http, msg.value() or b""


def post_once(
    session: requests.Session, url: str, headers: dict[str, str], body: bytes, timeout: float
) -> tuple[int | None, str]:
    """One attempt: (status, start of the answer), or (None, the network error)."""
    try:
        resp = session.post(url, data=body, headers=headers, timeout=timeout)
        return resp.status_code, resp.text[:ERROR_DATA_LIMIT]
    except requests.RequestException as exc:
        return None, f"{type(exc).__name__}: {exc}"


class _Deliverer:
    """Posts one record with Knative's retry rules; dead-letters it when they give up."""

    def __init__(self, source: KafkaSource, counters: Counters, stopping: threading.Event):
        self.source, self.counters, self.stopping = source, counters, stopping
        self._local = threading.local()
        self._producer: Producer | None = None
        self._lock = threading.Lock()

    def deliver(self, msg: Message) -> bool:
        """True once the record is done with; False if stop() cut its retries short."""
        headers, body = http_from_record(msg, self.source.group)
        delivery, attempt = self.source.delivery, 0
        if not hasattr(self._local, "session"):  # one Session (connection pool) per worker
            self._local.session = requests.Session()
        while True:
            status, data = post_once(
                self._local.session, self.source.sink, headers, body, delivery.timeout
            )
            if status is not None and status < 300:
                self.counters.add("delivered")
                return True
            attempt += 1
            _log(
                f"delivery failed topic={msg.topic()} partition={msg.partition()} "
                f"offset={msg.offset()} status={status or 'network'} "
                f"attempt={attempt}/{delivery.retry + 1}: {data[:200]!r}"
            )
            retryable = status is None or status >= 500 or status in RETRYABLE
            if not retryable or attempt > delivery.retry:
                self._give_up(msg, status, data, attempt)
                return True
            if self.stopping.wait(delivery.backoff(attempt)):
                return False
            self.counters.add("retried")

    def _give_up(self, msg: Message, status: int | None, data: str, attempts: int) -> None:
        topic = self.source.delivery.dead_letter_topic
        if topic is not None and self._dead_letter(msg, topic, status, data, attempts):
            self.counters.add("dead_lettered")
            return
        self.counters.add("lost")
        _log(
            f"LOST EVENT topic={msg.topic()} partition={msg.partition()} offset={msg.offset()} "
            f"after {attempts} attempt(s), last status {status}: "
            + ("no dead-letter topic" if topic is None else f"dead-letter topic {topic} failed")
        )

    def _dead_letter(
        self, msg: Message, topic: str, status: int | None, data: str, attempts: int
    ) -> bool:
        """Produce the record unchanged plus why it failed; True once acks=all confirmed it."""
        headers: list[tuple[str, str | bytes | None]] = [
            (k, v) for k, v in _header_pairs(msg) if not k.startswith(ERROR_HEADER)
        ]
        headers += [
            (ERROR_HEADER + "dest", self.source.sink),
            (ERROR_HEADER + "attempts", str(attempts)),
            (ERROR_HEADER + "data", data),
        ]
        if status is not None:
            headers.append((ERROR_HEADER + "code", str(status)))
        acked = threading.Event()
        errors: list[Any] = []

        def report(err: Any, _msg: Any) -> None:
            errors.append(err)
            acked.set()

        try:
            producer = self._dlq_producer()
            producer.produce(
                topic, value=msg.value(), key=msg.key(), headers=headers, on_delivery=report
            )
            deadline = time.monotonic() + DLQ_TIMEOUT
            while not acked.is_set() and time.monotonic() < deadline:
                producer.poll(0.05)
        except (KafkaException, BufferError) as exc:
            errors.append(exc)
        if acked.is_set() and errors == [None]:
            return True
        _log(f"dead-letter topic {topic} did not take offset {msg.offset()}: {errors or 'timeout'}")
        return False

    def _dlq_producer(self) -> Producer:
        with self._lock:
            if self._producer is None:
                self._producer = Producer(
                    {
                        "bootstrap.servers": self.source.bootstrap,
                        "logger": LOG,
                        "enable.idempotence": True,
                        "acks": "all",
                        "linger.ms": 5,
                        "message.timeout.ms": 30000,
                    }
                )
            return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)


@dataclass(eq=False)
class _Partition:
    """Per-partition bookkeeping: records buffered, offsets posted and not yet done with."""

    topic: str
    partition: int
    pending: deque[tuple[int, Message]] = field(default_factory=deque)
    flying: set[int] = field(default_factory=set)
    consumed: int = -1  # offset after the last record consumed
    committed: int = -1
    paused: bool = False

    def committable(self) -> int:
        """Only up to the lowest record not yet done with, whatever finished above it."""
        return min(self.flying, default=self.pending[0][0] if self.pending else self.consumed)


class _Member:
    """One group member: a consumer, its partitions and a worker pool, driven by run()."""

    def __init__(self, source: KafkaSource, deliverer: _Deliverer, stopping: threading.Event):
        self.source, self.deliverer, self.stopping = source, deliverer, stopping
        self.consumer = Consumer(
            {
                "bootstrap.servers": source.bootstrap,
                "logger": LOG,
                "group.id": source.group,
                "enable.auto.commit": False,
                "auto.offset.reset": source.initial_offset,
                "queued.min.messages": 1000,
                "queued.max.messages.kbytes": 16384,
            }
        )
        self.parts: dict[tuple[str, int], _Partition] = {}
        self.done: queue.Queue[tuple[_Partition, int, bool]] = queue.Queue()
        self.pool = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix="microfl-dispatch")
        self.in_flight = 0

    def run(self) -> None:
        self.consumer.subscribe(
            self.source.topics,
            on_assign=self._assigned,
            on_revoke=self._revoked,
            on_lost=lambda c, tps: self._revoked(c, tps, lost=True),
        )
        try:
            while not self.stopping.is_set():
                self._step()
        except Exception as exc:  # the thread would die silently otherwise
            _log(f"consumer of group {self.source.group} stopped on error: {exc!r}")
        finally:
            self._shutdown()

    def _step(self) -> None:
        self._collect(0.02 if self.in_flight else 0.0)
        # Block on Kafka only when idle: a record already buffered must not wait for new ones.
        busy = self.in_flight or any(p.pending for p in self.parts.values())
        for msg in self.consumer.consume(MAX_PENDING, timeout=0.0 if busy else 0.1):
            self._accept(msg)
        self._schedule()
        self._flow_control()
        self._commit(sync=False)

    def _accept(self, msg: Message) -> None:
        if (err := msg.error()) is not None:
            _log(f"consumer error: {err}")
            if err.fatal():
                raise KafkaException(err)
            return
        part = self.parts.get((msg.topic() or "", msg.partition() or 0))
        if part is not None:  # None: revoked since it was fetched
            offset = msg.offset() or 0
            part.pending.append((offset, msg))
            part.consumed = offset + 1

    def _schedule(self) -> None:
        """Ordered: one record in flight per partition. Unordered: up to MAX_IN_FLIGHT."""
        ready = [p for p in self.parts.values() if p.pending]
        if self.source.ordering == "ordered":
            for part in ready:
                if not part.flying:
                    self._submit(part)
            return
        while ready and self.in_flight < MAX_IN_FLIGHT:
            for part in ready[: MAX_IN_FLIGHT - self.in_flight]:
                self._submit(part)
            ready = [p for p in ready if p.pending]

    def _submit(self, part: _Partition) -> None:
        offset, msg = part.pending.popleft()
        part.flying.add(offset)
        self.in_flight += 1
        self.pool.submit(self._work, part, offset, msg)

    def _work(self, part: _Partition, offset: int, msg: Message) -> None:
        try:
            finished = self.deliverer.deliver(msg)
        except Exception as exc:  # a bug must not wedge the partition: count the record lost
            _log(f"LOST EVENT offset {msg.offset()} of {part.topic}/{part.partition}: {exc!r}")
            self.deliverer.counters.add("lost")
            finished = True
        self.done.put((part, offset, finished))

    def _collect(self, timeout: float) -> None:
        """Apply finished deliveries; wait up to timeout for the first one."""
        try:
            item = self.done.get(timeout=timeout) if timeout else self.done.get_nowait()
            while True:
                part, offset, finished = item
                self.in_flight -= 1
                if finished:  # else stop() cut it short: it stays uncommitted
                    part.flying.discard(offset)
                item = self.done.get_nowait()
        except queue.Empty:
            return

    def _flow_control(self) -> None:
        """Pause partitions whose buffer is full, resume them once it is half empty."""
        full = [p for p in self.parts.values() if not p.paused and len(p.pending) >= MAX_PENDING]
        empty = [p for p in self.parts.values() if p.paused and len(p.pending) <= MAX_PENDING // 2]
        if full:
            self.consumer.pause([TopicPartition(p.topic, p.partition) for p in full])
        if empty:
            self.consumer.resume([TopicPartition(p.topic, p.partition) for p in empty])
        for part in full + empty:
            part.paused = not part.paused

    def _commit(self, sync: bool) -> None:
        """Commit offset+1 of what is done; sync (on revoke and stop) re-commits everything, so
        a failed asynchronous commit only means redelivery after a crash."""
        due = {p: p.committable() for p in self.parts.values()}
        parts = [p for p, to in due.items() if to > (-1 if sync else p.committed)]
        if not parts:
            return
        offsets = [TopicPartition(p.topic, p.partition, due[p]) for p in parts]
        try:
            if sync:
                self.consumer.commit(offsets=offsets, asynchronous=False)
            else:
                self.consumer.commit(offsets=offsets, asynchronous=True)
        except KafkaException as exc:
            _log(f"commit failed (records will be redelivered): {exc}")
            return
        for part in parts:
            part.committed = due[part]

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.parts[(tp.topic, tp.partition)] = _Partition(tp.topic, tp.partition)

    def _revoked(
        self, consumer: Consumer, partitions: list[TopicPartition], lost: bool = False
    ) -> None:
        """Commit what is done; records still in flight are redelivered to the next owner."""
        if not lost:
            self._commit(sync=True)
        for tp in partitions:
            self.parts.pop((tp.topic, tp.partition), None)

    def _shutdown(self) -> None:
        """Let attempts in flight end (backoff waits end at once), commit, leave the group."""
        self.pool.shutdown(wait=True, cancel_futures=True)
        self._collect(0.0)
        self._commit(sync=True)
        self.parts.clear()
        self.consumer.close()


def _init_offsets(source: KafkaSource) -> None:
    """For initialOffset latest, commit the end offsets of a group that has none yet, like
    Knative's control plane before the source turns ready: "latest" means after start()."""
    if source.initial_offset != "latest":
        return
    consumer = Consumer(
        {
            "bootstrap.servers": source.bootstrap,
            "logger": LOG,
            "group.id": source.group,
            "enable.auto.commit": False,
        }
    )
    try:
        tps: list[TopicPartition] = []
        for topic in source.topics:
            meta = consumer.list_topics(topic, timeout=10).topics[topic]
            tps += [TopicPartition(topic, p) for p in meta.partitions]
        fresh = [tp for tp in consumer.committed(tps, timeout=10) if tp.offset < 0]
        for tp in fresh:
            tp.offset = consumer.get_watermark_offsets(tp, timeout=10)[1]
        if fresh:
            consumer.commit(offsets=fresh, asynchronous=False)
    except KafkaException as exc:
        _log(
            f"initial offsets of group {source.group} not set ({exc}); "
            "auto.offset.reset=latest applies at the first assignment instead"
        )
    finally:
        consumer.close()


class Dispatcher:
    """Runs a KafkaSource on daemon threads: start(), stop(), or use it as a context manager.
    Single use: after stop(), make a new Dispatcher."""

    def __init__(self, source: KafkaSource):
        self.source = source
        self.counters = Counters()
        self._stopping = threading.Event()
        self._deliverer = _Deliverer(source, self.counters, self._stopping)
        self._threads: list[threading.Thread] = []

    def start(self) -> Dispatcher:
        if self._threads or self._stopping.is_set():
            raise RuntimeError("a Dispatcher starts once; make a new one")
        _init_offsets(self.source)
        for i in range(self.source.consumers):
            member = _Member(self.source, self._deliverer, self._stopping)
            thread = threading.Thread(
                target=member.run, daemon=True, name=f"microfl-dispatcher-{self.source.group}-{i}"
            )
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Finish attempts in flight (no more retries), commit what is done, close the clients."""
        self._stopping.set()
        for thread in self._threads:
            thread.join()
        self._deliverer.close()

    def __enter__(self) -> Dispatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
