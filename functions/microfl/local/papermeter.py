"""What `microfl paper` measures besides accuracy: CPU seconds and peak RSS of each component's
process trees (function instances come and go, brokers are killed and restarted), and Kafka's
records and log bytes per broker, taken at iteration boundaries."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from microfl.events import TOPICS
from microfl.local.kafka import KafkaCluster
from microfl.local.paperreport import FUNCTIONS

__all__ = ["KafkaMeter", "ProcessMeter", "component_roots"]

MIB = 1 << 20


class ProcessMeter:
    """Samples every `every` seconds, in a thread, the processes under each component's roots
    (roots() -> {component: [pid, ...]}, asked afresh each time). `cut()` returns each
    component's CPU seconds since the previous cut and the peak of its summed RSS over the
    samples in between. A process born after start() counts from its first CPU tick; one that
    dies between two samples loses at most `every` seconds of CPU."""

    def __init__(self, roots: Callable[[], dict[str, list[int]]], every: float = 0.5) -> None:
        self.roots, self.every = roots, every
        self._last: dict[tuple[int, float], float] = {}
        self._cpu: dict[str, float] = {}
        self._peak: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._started = time.time()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="paper-meter")

    def start(self) -> ProcessMeter:
        self._started = time.time()
        self.sample()
        with self._lock:
            self._cpu.clear()  # what ran before start() is not the run's
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self.sample()

    def sample(self) -> None:
        with self._lock:
            for component, pids in self.roots().items():
                rss = 0
                for proc in _trees(pids):
                    try:
                        with proc.oneshot():
                            key = (proc.pid, proc.create_time())
                            times = proc.cpu_times()
                            rss += proc.memory_info().rss
                    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                        continue
                    cpu = times.user + times.system
                    before = self._last.get(key, 0.0 if key[1] >= self._started else cpu)
                    self._last[key] = cpu
                    self._cpu[component] = self._cpu.get(component, 0.0) + cpu - before
                self._peak[component] = max(self._peak.get(component, 0.0), rss / MIB)

    def cut(self) -> dict[str, dict[str, float]]:
        self.sample()
        with self._lock:
            out = {
                c: {"cpu_s": round(self._cpu.get(c, 0.0), 3), "peak_rss_mib": round(peak, 1)}
                for c, peak in self._peak.items()
            }
            self._cpu.clear()
            self._peak.clear()
        return out


def _trees(pids: list[int]) -> list[psutil.Process]:
    out = []
    for pid in pids:
        try:
            root = psutil.Process(pid)
            out += [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
    return out


def component_roots(runtime: Any, kafka: KafkaCluster, gcs: Any = None) -> dict[str, list[int]]:
    """{ingest|aggregate|finalize: the instances' pids, "broker N": the node's JVM pid, "store":
    the GCS emulator's pid (it is where a local run spends much of its CPU)}."""
    roots = {
        target: [fn.proc.pid for fn in runner.processes() if fn.proc is not None]
        for target, runner in runtime.services.items()
        if target in FUNCTIONS  # not the console: the experiment never opens it
    }
    for node in kafka.members:
        alive = node.proc is not None and node.alive
        roots[f"broker {node.node_id}"] = [node.proc.pid] if alive and node.proc else []
    if gcs is not None and gcs.proc is not None:
        roots["store"] = [gcs.proc.pid]
    return roots


def _log_size(folder: Path) -> int:
    total = 0
    for f in folder.rglob("*.log"):
        try:
            total += f.stat().st_size
        except OSError:  # a segment deleted or renamed under us
            continue
    return total


class KafkaMeter:
    """Records on the platform's topics (sum of their high watermarks: what was produced, once
    per record) and bytes of log segments on each broker's disk (replicas included, so a
    broker that was down shows its catch-up after the restart)."""

    def __init__(self, kafka: KafkaCluster) -> None:
        from confluent_kafka import Consumer

        self.kafka = kafka
        self.topics = sorted(set(TOPICS.values()))
        self.topics += [f"{t}.dlq" for t in self.topics]
        self.consumer = Consumer(
            {"bootstrap.servers": kafka.bootstrap, "group.id": "microfl-paper-meter",
             "enable.auto.commit": False, "log_level": 0}
        )  # fmt: skip

    def records(self) -> int | None:
        """None when a partition has no leader this moment (a broker just died)."""
        from confluent_kafka import KafkaException, TopicPartition

        total = 0
        try:
            meta = self.consumer.list_topics(timeout=10).topics
            for topic in self.topics:
                for p in meta[topic].partitions if topic in meta else ():
                    low_high = self.consumer.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=5, cached=False
                    )
                    if low_high is None:
                        return None
                    total += int(low_high[1])
        except KafkaException:
            return None
        return total

    def log_bytes(self) -> dict[str, int]:
        """{"broker N": bytes of its *.log segment files} (index files are preallocated)."""
        return {
            f"broker {n.node_id}": _log_size(Path(n.directory, "data")) for n in self.kafka.members
        }

    def isr_full(self) -> bool:
        """Every partition of the cluster has all its replicas in sync."""
        from confluent_kafka import KafkaException

        try:
            meta = self.consumer.list_topics(timeout=10).topics
        except KafkaException:
            return False
        return all(
            len(part.isrs) == len(part.replicas) and not part.error
            for topic in meta.values()
            for part in topic.partitions.values()
        )

    def close(self) -> None:
        self.consumer.close()
