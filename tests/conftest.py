"""Session fixtures that start the real local components on free 127.0.0.1 ports and stop them.

Set MICROFL_KAFKA_BOOTSTRAP to run the Kafka tests against an existing cluster instead.
`transport` runs a module once per event transport: Kafka, then Pub/Sub (emulator)."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from types import SimpleNamespace

import pytest

from microfl.local.gcs import FakeGcsServer
from microfl.local.kafka import KafkaCluster
from microfl.local.pubsub import PubSubEmulator


@pytest.fixture(scope="session")
def kafka(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimpleNamespace | KafkaCluster]:
    """One combined broker+controller (or MICROFL_KAFKA_BOOTSTRAP's cluster)."""
    existing = os.environ.get("MICROFL_KAFKA_BOOTSTRAP")
    if existing:
        yield SimpleNamespace(bootstrap=existing)
        return
    with KafkaCluster(tmp_path_factory.mktemp("kafka")) as cluster:
        yield cluster


@pytest.fixture(scope="session")
def gcs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeGcsServer]:
    """fake-gcs-server; STORAGE_EMULATOR_HOST points google-cloud-storage at it."""
    with FakeGcsServer(tmp_path_factory.mktemp("gcs")) as server:
        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = server.url
        yield server
        if old is None:
            os.environ.pop("STORAGE_EMULATOR_HOST", None)
        else:
            os.environ["STORAGE_EMULATOR_HOST"] = old


@pytest.fixture(scope="session")
def pubsub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PubSubEmulator]:
    """The Pub/Sub emulator (pstest over gRPC)."""
    with PubSubEmulator(tmp_path_factory.mktemp("pubsub")) as emulator:
        yield emulator


@pytest.fixture(scope="module", params=["kafka", "pubsub"])
def transport(request: pytest.FixtureRequest) -> SimpleNamespace:
    """The event transport a module's runtime uses: `bus`, the LocalRuntime address, and
    `stall(True|False)` to SIGSTOP/SIGCONT its processes (None for an external cluster)."""
    if request.param == "kafka":
        cluster = request.getfixturevalue("kafka")
        pids = cluster.pids() if isinstance(cluster, KafkaCluster) else []
        return SimpleNamespace(bus="kafka", address=cluster.bootstrap, stall=_staller(pids))
    emulator = request.getfixturevalue("pubsub")
    assert emulator.proc is not None
    return SimpleNamespace(bus="pubsub", address=emulator.host, stall=_staller([emulator.proc.pid]))


def _staller(pids: list[int]) -> Callable[[bool], None] | None:
    def stall(on: bool) -> None:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP if on else signal.SIGCONT)

    return stall if pids else None
