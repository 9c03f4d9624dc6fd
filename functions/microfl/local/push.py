"""The local stand-in for Pub/Sub's push delivery to the functions.

It pulls a push subscription's messages from the emulator and POSTs each as Pub/Sub pushes it
without wrapper (write_metadata): the message data is the body and its attributes are headers, so
a message published by PubSubBus arrives as a binary-mode CloudEvent; x-goog-pubsub-* headers carry
the metadata. An answer in PUSH_OK acks it. Anything else, or no answer within the ack deadline,
is a failed delivery: the message comes back after the retry policy's backoff (kept by the
emulator as the message's ack deadline, so nothing is lost if this process dies), and after
max_attempts deliveries the emulator moves it to the dead-letter topic. Ordering is the
emulator's too: an ordered subscription hands out one message per ordering key at a time."""

from __future__ import annotations

import logging
import math
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import requests

from microfl.local.dispatcher import Counters, post_once
from microfl.local.pubsub import PushSubscription, emulator_env

__all__ = ["PUSH_OK", "PushDispatcher", "http_from_message"]

PUSH_OK = frozenset({102, 200, 201, 202, 204})  # what Pub/Sub push counts as success
MAX_IN_FLIGHT = 16  # messages posted at once per subscription
IDLE_POLL = 0.1  # seconds between pulls while nothing arrives
LOG = logging.getLogger("microfl.dispatcher")
# The emulator still honours return_immediately; the client only warns that Pub/Sub may not.
warnings.filterwarnings("ignore", "The return_immediately flag", DeprecationWarning)


def http_from_message(message: Any, subscription: str) -> tuple[dict[str, str], bytes]:
    """Headers and body of the push request of one Pub/Sub message (no wrapper, metadata)."""
    headers = dict(message.attributes)
    headers["x-goog-pubsub-subscription-name"] = subscription
    headers["x-goog-pubsub-message-id"] = message.message_id
    headers["x-goog-pubsub-publish-time"] = message.publish_time.isoformat()
    if message.ordering_key:
        headers["x-goog-pubsub-ordering-key"] = message.ordering_key
    return headers, bytes(message.data)


class PushDispatcher:
    """Runs one push subscription on a daemon thread: start(), stop(). Single use."""

    def __init__(self, emulator_host: str, project: str, sub: PushSubscription, url: str):
        self.emulator_host, self.sub, self.url = emulator_host, sub, url
        self.path = f"projects/{project}/subscriptions/{sub.name}"
        self.counters = Counters()
        self._stopping = threading.Event()
        self._slots = threading.Semaphore(MAX_IN_FLIGHT)
        self._finished = threading.Event()
        self._local = threading.local()
        self._pool = ThreadPoolExecutor(MAX_IN_FLIGHT, thread_name_prefix=f"microfl-{sub.name}")
        self._thread = threading.Thread(target=self._run, daemon=True, name=f"microfl-{sub.name}")
        self._client: Any = None

    def start(self) -> PushDispatcher:
        from google.cloud import pubsub_v1

        with emulator_env(self.emulator_host):
            self._client = pubsub_v1.SubscriberClient()
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=0.1):
                continue
            free = 1
            while free < MAX_IN_FLIGHT and self._slots.acquire(blocking=False):
                free += 1
            try:
                received = self._client.pull(
                    request={
                        "subscription": self.path,
                        "max_messages": free,
                        # The emulator would hold an empty pull for 0.5 s, while an ordered
                        # key's next message waits only for the ack of the one in flight.
                        "return_immediately": True,
                    },
                    timeout=30,
                ).received_messages
            except Exception as exc:  # emulator down or restarting: try again shortly
                LOG.warning("pull from %s failed: %s", self.path, exc)
                received = []
                self._stopping.wait(1.0)
            for _ in range(free - len(received)):
                self._slots.release()
            if not received:  # poll again soon after a push ends, or every IDLE_POLL s
                self._finished.wait(IDLE_POLL)
                self._finished.clear()
            for item in received:
                self._pool.submit(self._deliver, item)

    def _deliver(self, item: Any) -> None:
        try:
            self._post(item)
        except Exception as exc:  # the emulator redelivers after the ack deadline
            LOG.warning("push of %s from %s failed: %r", item.message.message_id, self.path, exc)
        finally:
            self._slots.release()
            self._finished.set()

    def _post(self, item: Any) -> None:
        if not hasattr(self._local, "session"):  # one Session (connection pool) per worker
            self._local.session = requests.Session()
        headers, body = http_from_message(item.message, self.path)
        status, data = post_once(
            self._local.session, self.url, headers, body, self.sub.ack_deadline
        )
        if status in PUSH_OK:
            self._client.acknowledge(request={"subscription": self.path, "ack_ids": [item.ack_id]})
            self.counters.add("delivered")
            return
        attempt = max(item.delivery_attempt, 1)
        last = attempt >= self.sub.max_attempts
        self.counters.add("dead_lettered" if last else "retried")
        LOG.warning(
            "push failed subscription=%s message=%s status=%s attempt=%d/%d%s: %r",
            self.sub.name,
            item.message.message_id,
            status or "network",
            attempt,
            self.sub.max_attempts,
            f" -> dead-letter topic {self.sub.dead_letter_topic}" if last else "",
            data[:200],
        )
        delay = 0 if last else math.ceil(self.sub.backoff(attempt))
        self._client.modify_ack_deadline(
            request={
                "subscription": self.path,
                "ack_ids": [item.ack_id],
                "ack_deadline_seconds": delay,
            }
        )

    def stop(self) -> None:
        """Let pushes in flight end; what is not acked stays in the emulator for redelivery."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        self._pool.shutdown(wait=True)
        if self._client is not None:
            self._client.close()
