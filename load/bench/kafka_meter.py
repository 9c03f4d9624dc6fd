"""Kafka traffic of the platform's topics between two moments: records from the partitions'
high watermarks, bytes by consuming exactly those records (key + value + headers, what the
functions and the dispatcher put on the wire, before batching and compression)."""

from __future__ import annotations

import time
import uuid
from typing import Any

__all__ = ["platform_topics", "traffic", "watermarks"]


def platform_topics() -> list[str]:
    from microfl.events import TOPICS

    names = sorted(set(TOPICS.values()))
    return names + [f"{n}.dlq" for n in names]


def _consumer(bootstrap: str) -> Any:
    from confluent_kafka import Consumer

    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"microfl-bench-meter-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "log_level": 0,
        }
    )


def watermarks(bootstrap: str, topics: list[str]) -> dict[str, int]:
    """'topic/partition' -> high watermark (the offset the next record will get)."""
    from confluent_kafka import TopicPartition

    consumer = _consumer(bootstrap)
    try:
        out = {}
        meta = consumer.list_topics(timeout=10).topics
        for topic in topics:
            if topic not in meta:
                continue
            for p in meta[topic].partitions:
                out[f"{topic}/{p}"] = _high(consumer, TopicPartition(topic, p))
        return out
    finally:
        consumer.close()


def _high(consumer: Any, tp: Any, timeout: float = 30.0) -> int:
    """The high watermark; a topic created a moment ago may not have a leader yet."""
    from confluent_kafka import KafkaException

    deadline = time.monotonic() + timeout
    while True:
        try:
            return int(consumer.get_watermark_offsets(tp, timeout=10)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def traffic(bootstrap: str, before: dict[str, int], after: dict[str, int]) -> dict[str, Any]:
    """Records and bytes per topic between two watermark snapshots, and when the first and last
    record of each event type was produced (broker timestamps, wall-clock seconds)."""
    from confluent_kafka import TopicPartition

    per_topic: dict[str, dict[str, int]] = {}
    times: dict[str, tuple[float, float]] = {}
    wanted = []
    for tp, high in after.items():
        topic, p = tp.rsplit("/", 1)
        low = before.get(tp, 0)
        per_topic.setdefault(topic, {"records": 0, "bytes": 0})
        if high > low:
            wanted.append((TopicPartition(topic, int(p), low), high))
    consumer = _consumer(bootstrap)
    try:
        if wanted:
            consumer.assign([tp for tp, _ in wanted])
        left = {(tp.topic, tp.partition): high for tp, high in wanted}
        idle = 0
        while left and idle < 50:
            msgs = consumer.consume(1000, timeout=0.2)
            idle = 0 if msgs else idle + 1
            for msg in msgs:
                if msg.error() is not None:
                    continue
                key = (msg.topic(), msg.partition())
                high = left.get(key)
                if high is None or msg.offset() >= high:
                    continue
                size = len(msg.value() or b"") + len(msg.key() or b"")
                size += sum(len(k) + len(v or b"") for k, v in (msg.headers() or []))
                entry = per_topic[msg.topic()]
                entry["records"] += 1
                entry["bytes"] += size
                kind = dict(msg.headers() or []).get("ce_type", b"").decode() or msg.topic()
                stamp = msg.timestamp()[1] / 1000
                first, last = times.get(kind, (stamp, stamp))
                times[kind] = (min(first, stamp), max(last, stamp))
                if msg.offset() + 1 >= high:
                    del left[key]
    finally:
        consumer.close()
    return {
        "topics": per_topic,
        "records": sum(t["records"] for t in per_topic.values()),
        "bytes": sum(t["bytes"] for t in per_topic.values()),
        "complete": not wanted or not left,
        "produced": {k: {"first": a, "last": b} for k, (a, b) in sorted(times.items())},
    }
