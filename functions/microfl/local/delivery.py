"""How the local KafkaSource delivers one record (DESIGN.md, "Event delivery"): Knative's
delivery settings, the record as a binary-mode CloudEvent over HTTP, retries with backoff and
dead-lettering, as eventing-kafka-broker's dispatcher does them. microfl.local.dispatcher drives
consumers, partitions and offsets around it."""

from __future__ import annotations

import base64
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import requests
from confluent_kafka import KafkaException, Message, Producer

__all__ = [
    "Counters",
    "Deliverer",
    "Delivery",
    "KafkaSource",
    "http_from_record",
    "parse_duration",
    "post_once",
]

KAFKA_EVENT_TYPE = "dev.knative.kafka.event"
SOURCE_URI = "/apis/v1/namespaces/default/kafkasources/{name}#{topic}"
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


class Deliverer:
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
