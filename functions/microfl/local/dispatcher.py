"""The local stand-in for Knative's KafkaSource: Kafka records in, CloudEvents over HTTP POST out.

It reproduces what functions can observe of eventing-kafka-broker's dispatcher (DESIGN.md, "Event
delivery"): retried statuses, backoff, dead-lettering, offset commits, ordering, CloudEvent shape.
Each group member's thread alone touches its Consumer; HTTP attempts run on a worker pool, one
record each by microfl.local.delivery (whose names are re-exported here)."""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, Message, TopicPartition

from microfl.local.delivery import (
    LOG,
    Counters,
    Deliverer,
    Delivery,
    KafkaSource,
    http_from_record,
    parse_duration,
    post_once,
)

__all__ = [
    "Counters",
    "Delivery",
    "Dispatcher",
    "KafkaSource",
    "http_from_record",
    "parse_duration",
    "post_once",
]

MAX_IN_FLIGHT = 16  # records posted at once per consumer (unordered), and worker threads
MAX_PENDING = 64  # records buffered per partition before it is paused: memory stays bounded
JOIN_WAIT = 30.0  # seconds start() waits for every member's first assignment


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

    def __init__(self, source: KafkaSource, deliverer: Deliverer, stopping: threading.Event):
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
        self.joined = threading.Event()  # the group gave this member its first assignment

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
            LOG.warning(f"consumer of group {self.source.group} stopped on error: {exc!r}")
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
            LOG.warning(f"consumer error: {err}")
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
            LOG.warning(
                f"LOST EVENT offset {msg.offset()} of {part.topic}/{part.partition}: {exc!r}"
            )
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
            LOG.warning(f"commit failed (records will be redelivered): {exc}")
            return
        for part in parts:
            part.committed = due[part]

    def _assigned(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        for tp in partitions:
            self.parts[(tp.topic, tp.partition)] = _Partition(tp.topic, tp.partition)
        self.joined.set()

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
        LOG.warning(
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
        self._deliverer = Deliverer(source, self.counters, self._stopping)
        self._threads: list[threading.Thread] = []

    def start(self) -> Dispatcher:
        """Start the members and wait (JOIN_WAIT at most) until the group has assigned each its
        partitions, as a KafkaSource turns ready once its consumers run: the first events of a
        platform just started then wait for no group join (seconds on a fresh broker)."""
        if self._threads or self._stopping.is_set():
            raise RuntimeError("a Dispatcher starts once; make a new one")
        _init_offsets(self.source)
        members = []
        for i in range(self.source.consumers):
            member = _Member(self.source, self._deliverer, self._stopping)
            thread = threading.Thread(
                target=member.run, daemon=True, name=f"microfl-dispatcher-{self.source.group}-{i}"
            )
            thread.start()
            self._threads.append(thread)
            members.append(member)
        deadline = time.monotonic() + JOIN_WAIT
        for member in members:
            if not member.joined.wait(max(0.0, deadline - time.monotonic())):
                LOG.warning(
                    f"group {self.source.group}: no partitions assigned within {JOIN_WAIT:g} s; "
                    "events wait until the group has joined"
                )
                break
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
