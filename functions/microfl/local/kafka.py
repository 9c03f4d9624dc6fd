"""A real Apache Kafka (KRaft) broker or cluster on 127.0.0.1, from Maven Central jars.

The jars (infra/local/pom.xml, pinned by infra/local/kafka-jars.lock) are fetched once by jgo into
a git-ignored cache folder (microfl.local.kafkajars) and run with Java 17+ (the machine's or the
project's pinned copy: microfl.local.toolchains). Two layouts: one combined broker+controller node
(the default), or three combined nodes with replication factor 3 and min.insync.replicas 2 for
fault tests.
"""

from __future__ import annotations

import base64
import logging
import shutil
import signal
import socket
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from microfl.errors import BusUnavailable
from microfl.events import TOPICS
from microfl.local import kafkajars, toolchains
from microfl.local.procs import HOST, free_port, repo_root, spawn, stop_process, wait_until

__all__ = ["KafkaCluster", "ensure_kafka_libs", "ensure_topics"]

KAFKA_MAIN = "kafka.Kafka"
STORAGE_TOOL = "kafka.tools.StorageTool"


def _listening(port: int) -> bool:
    with socket.create_connection((HOST, port), timeout=1):
        return True


def _kafka_version(pom: Path) -> str:
    text = pom.read_text()
    start = text.index("<kafka.version>") + len("<kafka.version>")
    return text[start : text.index("</kafka.version>", start)]


def ensure_kafka_libs(quiet: bool = False, libs: Path | None = None) -> Path:
    """The folder of broker jars (by default in .cache), fetched on first use."""
    version = _kafka_version(repo_root() / "infra" / "local" / "pom.xml")
    libs = libs or repo_root() / ".cache" / f"kafka-{version}" / "libs"
    if not (libs / ".complete").is_file():
        done = kafkajars.assemble(libs, version, quiet)
        if not quiet:
            print(f"Kafka jars in {libs} (first run only): {done}", file=sys.stderr, flush=True)
    return libs


@dataclass
class KafkaNode:
    node_id: int
    port: int
    controller_port: int
    directory: Path
    log_path: Path
    proc: subprocess.Popen | None = None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class KafkaCluster:
    """Start with start(), stop with stop(); kill(i)/restart(i) for fault tests."""

    workdir: Path
    nodes: int = 1
    heap: str = "512m"
    logdir: Path | None = None  # default: each node's log in its own folder
    members: list[KafkaNode] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.nodes not in (1, 3):
            raise ValueError("the local Kafka runs 1 node (default) or 3 nodes (RF 3, min ISR 2)")
        self.workdir = Path(self.workdir)
        self.members = [
            KafkaNode(
                i,
                free_port(),
                free_port(),
                self.workdir / f"node-{i}",
                Path(self.logdir) / f"kafka-{i}.log"
                if self.logdir
                else self.workdir / f"node-{i}" / "broker.log",
            )
            for i in range(1, self.nodes + 1)
        ]

    @property
    def bootstrap(self) -> str:
        return ",".join(f"{HOST}:{n.port}" for n in self.members)

    @property
    def replication(self) -> tuple[int, int]:
        """(replication factor, min.insync.replicas) of this layout."""
        return (3, 2) if self.nodes == 3 else (1, 1)

    def _properties(self, node: KafkaNode) -> str:
        rf, isr = self.replication
        voters = ",".join(f"{n.node_id}@{HOST}:{n.controller_port}" for n in self.members)
        settings = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://{HOST}:{node.port},CONTROLLER://{HOST}:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://{HOST}:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": node.directory / "data",
            "num.partitions": 1,
            "default.replication.factor": rf,
            "min.insync.replicas": isr,
            "offsets.topic.replication.factor": rf,
            "offsets.topic.num.partitions": 10,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "unclean.leader.election.enable": "false",
            "group.initial.rebalance.delay.ms": 0,
            # Fence a dead broker within seconds rather than the default 9 s.
            "broker.session.timeout.ms": 3000,
            "broker.heartbeat.interval.ms": 500,
        }
        return "".join(f"{k}={v}\n" for k, v in settings.items())

    def _java(self, main: str, *args: str) -> list[str]:
        libs = ensure_kafka_libs()
        log4j = repo_root() / "infra" / "local" / "log4j2.yaml"
        return [
            str(toolchains.java().path),
            f"-Xmx{self.heap}",
            "-Xms128m",
            "-Djava.awt.headless=true",
            f"-Dlog4j2.configurationFile={log4j}",
            "-cp",
            f"{libs}/*",
            main,
            *args,
        ]

    def start(self, timeout: float = 90.0) -> KafkaCluster:
        """A fresh cluster: earlier data in workdir is wiped (restart() keeps a node's data)."""
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        formats = []
        for node in self.members:
            shutil.rmtree(node.directory, ignore_errors=True)
            node.directory.mkdir(parents=True)
            conf = node.directory / "server.properties"
            conf.write_text(self._properties(node))
            formats.append(
                spawn(
                    # --cluster-id=ID: a base64 id may start with "-", which would read as an option
                    self._java(
                        STORAGE_TOOL, "format", f"--cluster-id={cluster_id}", "-c", str(conf)
                    ),
                    node.log_path,
                )
            )
        for node, proc in zip(self.members, formats, strict=True):
            if proc.wait(timeout=timeout) != 0:
                raise RuntimeError(
                    f"formatting Kafka node {node.node_id} failed; see {node.log_path}"
                )
        for node in self.members:
            self.restart(node.node_id, wait=False)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 90.0, brokers: int | None = None) -> None:
        """Wait until `brokers` (default: every live node) are registered with the controller."""
        from confluent_kafka.admin import AdminClient

        want = brokers if brokers is not None else sum(n.alive for n in self.members)
        live = [n for n in self.members if n.alive]
        what = f"Kafka ({want} of {self.nodes} brokers)"
        for node in live:  # listening first, so the admin client does not log refusals
            wait_until(partial(_listening, node.port), timeout, what, node.proc, node.log_path)
        admin = AdminClient(
            {"bootstrap.servers": ",".join(f"{HOST}:{n.port}" for n in live), "log_level": 0}
        )
        wait_until(
            lambda: len(admin.list_topics(timeout=2).brokers) >= want,
            timeout,
            what,
            live[0].proc,
            live[0].log_path,
        )

    def node(self, node_id: int) -> KafkaNode:
        return self.members[node_id - 1]

    def kill(self, node_id: int) -> None:
        """SIGKILL one node: no shutdown hook, no flush."""
        node = self.node(node_id)
        if node.proc is not None and node.alive:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait()

    def restart(self, node_id: int, wait: bool = True, timeout: float = 90.0) -> None:
        node = self.node(node_id)
        if node.alive:
            raise RuntimeError(f"Kafka node {node_id} is already running")
        node.proc = spawn(
            self._java(KAFKA_MAIN, str(node.directory / "server.properties")), node.log_path
        )
        if wait:
            self.wait_ready(timeout)

    def active_controller(self) -> int | None:
        """The KRaft quorum leader: the node that last logged becoming Leader (DescribeCluster
        answers a random broker in KRaft mode, so the logs are the honest source here)."""
        latest: tuple[str, int] | None = None
        for node in self.members:
            if not node.alive or not node.log_path.is_file():
                continue
            for line in node.log_path.read_text(errors="replace").splitlines():
                if f"[RaftManager id={node.node_id}] Completed transition to Leader" in line:
                    stamp = line[: line.index("]") + 1]
                    if latest is None or stamp > latest[0]:
                        latest = (stamp, node.node_id)
        return latest[1] if latest else None

    def pids(self) -> list[int]:
        return [n.proc.pid for n in self.members if n.proc is not None and n.alive]

    def stop(self) -> None:
        """Controlled shutdown of every node at once (SIGTERM), SIGKILL after a grace period."""
        procs = [n.proc for n in self.members if n.proc is not None and n.alive]
        for proc in procs:
            proc.terminate()
        for proc in procs:
            stop_process(proc)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def ensure_topics(bootstrap: str, partitions: int = 3, replication: int = 1) -> None:
    """Create the platform's topics (and dead-letter topics) if they are missing: provisioning for
    the local platform and the tests (a cluster's topics come with infra/terraform)."""
    from confluent_kafka.admin import AdminClient, NewTopic

    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        "logger": logging.getLogger("microfl.local.kafka"),
    }
    admin = AdminClient(config)
    names = sorted(set(TOPICS.values()))
    names += [f"{n}.dlq" for n in names]
    existing = set(admin.list_topics(timeout=15).topics)
    new = [
        NewTopic(n, num_partitions=partitions, replication_factor=replication)
        for n in names
        if n not in existing
    ]
    if new:
        for name, future in admin.create_topics(new).items():
            try:
                future.result(30)
            except Exception as exc:
                if "TOPIC_ALREADY_EXISTS" not in str(exc):
                    raise BusUnavailable(f"cannot create topic {name}: {exc}") from exc


def read_events(bootstrap: str, topics: list[str], idle: float = 2.0) -> list[tuple[dict, str]]:
    """(event data, ce_type) of every record on the topics, read from the start until none has
    come for `idle` seconds (the fault scenarios count dead letters and announcements)."""
    import json
    import time

    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": uuid.uuid4().hex,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe(topics)
    found = []
    until = time.monotonic() + 5
    while time.monotonic() < until:
        for msg in consumer.consume(100, 0.5):
            if msg.error() is None:
                until = time.monotonic() + idle
                kind = dict(msg.headers() or []).get("ce_type")
                try:
                    data = json.loads(msg.value() or b"{}")
                except ValueError:
                    continue
                text = kind.decode("latin-1") if isinstance(kind, bytes) else kind or ""
                found.append((data if isinstance(data, dict) else {}, text))
    consumer.close()
    return found
