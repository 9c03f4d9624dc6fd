"""The real local Kafka: idempotent acks=all production on one broker, and on the 3-node cluster
(RF 3, min ISR 2) a broker SIGKILLed mid-production loses no acknowledged record."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator

import pytest
from confluent_kafka import KafkaError, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from kafka_topics import consume
from microfl.local.kafka import KafkaCluster


def create_topic(bootstrap: str, partitions: int, rf: int, min_isr: int) -> str:
    name = f"t-{uuid.uuid4().hex[:10]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topic = NewTopic(
        name,
        num_partitions=partitions,
        replication_factor=rf,
        config={"min.insync.replicas": str(min_isr)},
    )
    admin.create_topics([topic])[name].result(timeout=30)
    return name


def idempotent_producer(bootstrap: str) -> Producer:
    return Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": 120000,
        }
    )


def test_idempotent_produce_and_consume_on_single_broker(kafka: KafkaCluster) -> None:
    topic = create_topic(kafka.bootstrap, partitions=3, rf=1, min_isr=1)
    producer = idempotent_producer(kafka.bootstrap)
    acked: list[bytes] = []
    for i in range(2000):
        producer.produce(
            topic,
            key=str(i % 7).encode(),
            value=f"r{i}".encode(),
            on_delivery=lambda err, msg: err is None and acked.append(msg.value()),
        )
        producer.poll(0)
    assert producer.flush(30) == 0
    assert len(acked) == 2000

    values = [m.value() for m in consume(kafka.bootstrap, topic, 2000, linger=2.0)]
    assert sorted(values) == sorted(acked)
    # Order within a key (one partition) is production order.
    for key in range(7):
        seq = [int(v[1:]) for v in values if int(v[1:]) % 7 == key]
        assert seq == sorted(seq)


@pytest.fixture(scope="module")
def kafka3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KafkaCluster]:
    with KafkaCluster(tmp_path_factory.mktemp("kafka3"), nodes=3) as cluster:
        yield cluster


def partition_leader(bootstrap: str, topic: str, partition: int = 0) -> int:
    meta = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return int(meta.topics[topic].partitions[partition].leader)


def test_broker_sigkill_loses_no_acknowledged_record(kafka3: KafkaCluster) -> None:
    assert kafka3.replication == (3, 2)
    topic = create_topic(kafka3.bootstrap, partitions=3, rf=3, min_isr=2)
    producer = idempotent_producer(kafka3.bootstrap)
    acked: list[bytes] = []
    failed: list[str] = []
    lock = threading.Lock()

    def on_delivery(err: KafkaError | None, msg: object) -> None:
        with lock:
            if err is None:
                acked.append(msg.value())  # type: ignore[attr-defined]
            else:
                failed.append(str(err))

    def produce(start: int, count: int) -> None:
        for i in range(start, start + count):
            producer.produce(
                topic, key=str(i % 3).encode(), value=f"r{i}".encode(), on_delivery=on_delivery
            )
            producer.poll(0)
            time.sleep(0.002)

    produce(0, 1000)
    producer.flush(30)
    before_kill = len(acked)
    assert before_kill == 1000

    victim = partition_leader(kafka3.bootstrap, topic)
    writer = threading.Thread(target=produce, args=(1000, 3000))
    writer.start()
    time.sleep(0.5)
    kafka3.kill(victim)  # SIGKILL the leader of partition 0 while records are in flight
    writer.join()
    assert producer.flush(120) == 0
    assert not failed, failed[:3]
    assert len(acked) == 4000, "production continued through the broker's death"

    survivors = ",".join(f"127.0.0.1:{n.port}" for n in kafka3.members if n.alive)
    assert partition_leader(survivors, topic) != victim
    values = [m.value() for m in consume(survivors, topic, len(acked), linger=2.0)]
    assert sorted(values) == sorted(acked), "every acknowledged record is consumed exactly once"

    # The killed node rejoins and catches up.
    kafka3.restart(victim)
    assert (
        len(AdminClient({"bootstrap.servers": kafka3.bootstrap}).list_topics(timeout=10).brokers)
        == 3
    )
