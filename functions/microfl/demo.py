"""`microfl demo`: start the local platform's real parts and show them working.

Until the data plane lands this is the foundation's smoke run: records through the real Kafka
broker with an idempotent acks=all producer, and create-only writes through the GCS emulator."""

from __future__ import annotations

import argparse
import time
import uuid

from google.api_core.exceptions import PreconditionFailed
from google.auth.credentials import AnonymousCredentials

__all__ = ["run_demo"]


def run_demo(args: argparse.Namespace) -> int:
    from confluent_kafka import Consumer, Producer
    from confluent_kafka.admin import AdminClient, NewTopic
    from google.cloud import storage

    from microfl.local.platform import LocalPlatform

    t0 = time.monotonic()
    platform = LocalPlatform(gcs=True)
    print("starting the local platform (Kafka broker, GCS emulator) ...", flush=True)
    try:
        state = platform.start()
        print(f"  up in {time.monotonic() - t0:.1f}s: Kafka {state['kafka_bootstrap']}, "
              f"GCS emulator {state['storage_emulator_host']}")
        bootstrap = state["kafka_bootstrap"]
        topic = f"demo-{uuid.uuid4().hex[:8]}"
        admin = AdminClient({"bootstrap.servers": bootstrap})
        admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])[topic].result(30)
        producer = Producer({"bootstrap.servers": bootstrap, "enable.idempotence": True,
                             "acks": "all"})
        acked = []
        for i in range(100):
            producer.produce(topic, value=f"update-{i}".encode(),
                             on_delivery=lambda e, m: e is None and acked.append(m.value()))
        producer.flush(30)
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo",
                             "auto.offset.reset": "earliest"})
        consumer.subscribe([topic])
        got: list[bytes] = []
        deadline = time.monotonic() + 30
        while len(got) < len(acked) and time.monotonic() < deadline:
            got += [m.value() for m in consumer.consume(100, 1.0) if m.error() is None]
        consumer.close()
        print(f"  Kafka: {len(acked)} records acknowledged (acks=all, idempotent), "
              f"{len(got)} consumed back")

        client = storage.Client(project="demo", credentials=AnonymousCredentials(),
                                client_options={"api_endpoint": state["storage_emulator_host"]})
        bucket = client.create_bucket("microfl-demo")
        bucket.blob("jobs/demo/models/1").upload_from_string(b"model v1", if_generation_match=0)
        try:
            bucket.blob("jobs/demo/models/1").upload_from_string(b"other", if_generation_match=0)
            print("  GCS: second create-only write was NOT refused")
            return 1
        except PreconditionFailed:
            print("  GCS emulator: model written create-only; a second writer got 412")
        ok = sorted(got) == sorted(acked) and len(acked) == 100
        print(f"demo {'passed' if ok else 'FAILED'} in {time.monotonic() - t0:.1f}s")
        return 0 if ok else 1
    finally:
        platform.stop()
