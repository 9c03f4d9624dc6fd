"""Reading a test broker's topic from the start, for tests that check what landed on Kafka."""

from __future__ import annotations

import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError


def consume(
    bootstrap: str, topic: str, expected: int, timeout: float = 60.0, linger: float = 0.0
) -> list[Any]:
    """The topic's messages from the earliest offset, until `expected` arrived or timeout; then
    `linger` seconds more, so that a duplicate would show up too."""
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    found: list[Any] = []

    def read_until(deadline: float, enough: int | None) -> None:
        while time.monotonic() < deadline and (enough is None or len(found) < enough):
            for msg in consumer.consume(500, timeout=0.5):
                err = msg.error()
                if err is None:
                    found.append(msg)
                elif err.code() != KafkaError._PARTITION_EOF:
                    raise AssertionError(err)

    try:
        read_until(time.monotonic() + timeout, expected)
        read_until(time.monotonic() + linger, None)
    finally:
        consumer.close()
    return found
