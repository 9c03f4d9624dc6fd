"""The Pub/Sub transport against the emulator: what PubSubBus publishes (the CloudEvents Pub/Sub
binding, ordering keys), and the local push delivery's success, retry, ordering and dead-letter
behaviour, seen from a recording HTTP sink."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from google.cloud import pubsub_v1

from fl import eventually
from microfl import events
from microfl.bus import PubSubBus
from microfl.errors import BusUnavailable
from microfl.local.procs import HOST, free_port
from microfl.local.pubsub import (
    PROJECT,
    PubSubEmulator,
    PushSubscription,
    emulator_env,
    ensure_pubsub,
)
from microfl.local.push import PushDispatcher, http_from_message
from microfl.serde import event_from_http


class Sink:
    """Records every push (time, headers, body) and answers with answer(n, headers), n counting
    the requests that carry the same message id."""

    def __init__(self, answer: Callable[[int, dict[str, str]], int]) -> None:
        self.answer = answer
        self.requests: list[tuple[float, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                headers = dict(self.headers.items())
                with sink.lock:
                    sink.requests.append((time.monotonic(), headers, body))
                    n = sum(
                        h.get("x-goog-pubsub-message-id") == headers.get("x-goog-pubsub-message-id")
                        for _, h, _ in sink.requests
                    )
                self.send_response(sink.answer(n, headers))
                self.send_header("Content-Length", "0")
                self.end_headers()

        self.server = ThreadingHTTPServer((HOST, 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://{HOST}:{self.server.server_address[1]}/"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def push(pubsub: PubSubEmulator) -> Iterator[Callable[..., tuple[PushDispatcher, Sink]]]:
    """push(answer, **subscription settings): a fresh topic and push subscription to a Sink."""
    started: list[tuple[PushDispatcher, Sink]] = []

    def make(answer: Callable[[int, dict[str, str]], int], **settings: Any) -> tuple[Any, Sink]:
        name = f"t-{uuid.uuid4().hex[:8]}"
        sub = PushSubscription(name, name, "sink", **settings)
        sink = Sink(answer)
        ensure_pubsub(pubsub.host, PROJECT, {"sink": sink.url}, (sub,))
        dispatcher = PushDispatcher(pubsub.host, PROJECT, sub, sink.url).start()
        started.append((dispatcher, sink))
        return dispatcher, sink

    yield make
    for dispatcher, sink in started:
        dispatcher.stop()
        sink.close()


def publish(host: str, topic: str, key: str, n: int) -> list[str]:
    """n messages with ordering key `key`; their data, in publish order."""
    with emulator_env(host):
        publisher = pubsub_v1.PublisherClient(
            publisher_options=pubsub_v1.types.PublisherOptions(enable_message_ordering=True)
        )
    path = publisher.topic_path(PROJECT, topic)
    data = [f"{key}-{i}" for i in range(n)]
    for d in data:
        publisher.publish(path, d.encode(), ordering_key=key).result(10)
    return data


def test_pubsub_bus_sends_each_event_as_a_binary_cloudevent_push(
    pubsub: PubSubEmulator, push: Callable[..., tuple[PushDispatcher, Sink]]
) -> None:
    """What the functions publish reaches the sink as the request a KafkaSource would send."""
    ensure_pubsub(pubsub.host, PROJECT, {}, ())
    sub = f"probe-{uuid.uuid4().hex[:6]}"
    with emulator_env(pubsub.host):
        subscriber = pubsub_v1.SubscriberClient()
        bus = PubSubBus(PROJECT)
        path = subscriber.subscription_path(PROJECT, sub)
        subscriber.create_subscription(
            request={
                "name": path,
                "topic": f"projects/{PROJECT}/topics/microfl.finalize",
                "enable_message_ordering": True,
            }
        )
        sent = [events.update_accepted("job-a", 1, f"c{i}") for i in range(5)]
        sent.append(events.partial_ready("job-a", 1, 0, 0))
        bus.publish(sent, key="job-a")
        got: list[Any] = []
        while len(got) < len(sent):
            for item in subscriber.pull(
                request={"subscription": path, "max_messages": 10}
            ).received_messages:
                got.append(item.message)
                subscriber.acknowledge(request={"subscription": path, "ack_ids": [item.ack_id]})
    assert [m.ordering_key for m in got] == ["job-a"] * len(sent)
    assert got[0].attributes["ce-specversion"] == "1.0"
    assert got[0].attributes["content-type"] == "application/json"
    received = [event_from_http(*http_from_message(m, path)) for m in got]
    assert received == sent, "same events, in publish order (one ordering key)"


def test_pubsub_bus_raises_bus_unavailable_when_the_emulator_is_gone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", f"{HOST}:{free_port()}")
    bus = PubSubBus(PROJECT, timeout=1.0)
    t0 = time.monotonic()
    with pytest.raises(BusUnavailable, match="did not acknowledge 1 event"):
        bus.publish([events.round_committed("job-b", 1)], key="job-b")
    assert time.monotonic() - t0 < 30
    # The ordering key is usable again: a retry gets the same clear error, not the client's
    # "ordering key paused" exception.
    with pytest.raises(BusUnavailable, match="did not acknowledge 1 event"):
        bus.publish([events.round_committed("job-b", 2)], key="job-b")


def test_push_acks_on_success_and_sends_metadata_headers(
    pubsub: PubSubEmulator, push: Callable[..., tuple[PushDispatcher, Sink]]
) -> None:
    dispatcher, sink = push(lambda n, h: 204, ordered=False)
    data = publish(pubsub.host, dispatcher.sub.topic, "k", 20)
    eventually(lambda: dispatcher.counters.delivered == 20, "20 pushes acked")
    time.sleep(1.0)  # nothing comes back: every message was acked
    assert sorted(body.decode() for _, _, body in sink.requests) == sorted(data)
    headers = sink.requests[0][1]
    assert headers["x-goog-pubsub-subscription-name"] == dispatcher.path
    assert headers["x-goog-pubsub-ordering-key"] == "k"
    assert headers["x-goog-pubsub-message-id"]


def test_push_retries_with_the_retry_policy_then_dead_letters(
    pubsub: PubSubEmulator, push: Callable[..., tuple[PushDispatcher, Sink]]
) -> None:
    dispatcher, sink = push(
        lambda n, h: 503, ordered=False, min_backoff=1, max_backoff=2, max_attempts=5
    )
    publish(pubsub.host, dispatcher.sub.topic, "", 1)
    dlq = f"projects/{PROJECT}/subscriptions/{dispatcher.sub.name}-dlq"
    with emulator_env(pubsub.host):
        subscriber = pubsub_v1.SubscriberClient()
    dead: list[Any] = []

    def dead_lettered() -> bool:
        dead.extend(
            subscriber.pull(request={"subscription": dlq, "max_messages": 5}).received_messages
        )
        return bool(dead)

    eventually(dead_lettered, "the message in the dead-letter subscription", timeout=60)
    times = [t for t, _, _ in sink.requests]
    assert len(times) == 5, "max_attempts deliveries, then the dead-letter topic"
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert all(g >= w - 0.05 for g, w in zip(gaps, [1, 2, 2, 2], strict=True)), gaps
    assert dead[0].message.data == b"-0"
    assert (dispatcher.counters.retried, dispatcher.counters.dead_lettered) == (4, 1)


def test_ordered_push_holds_a_key_until_its_message_succeeds(
    pubsub: PubSubEmulator, push: Callable[..., tuple[PushDispatcher, Sink]]
) -> None:
    """Every message of key a fails twice: each next one waits for the one before; b goes on."""
    dispatcher, sink = push(
        lambda n, h: 500 if (h.get("x-goog-pubsub-ordering-key") == "a" and n <= 2) else 200,
        ordered=True,
        min_backoff=1,
        max_backoff=1,
    )
    first_a = publish(pubsub.host, dispatcher.sub.topic, "a", 4)
    first_b = publish(pubsub.host, dispatcher.sub.topic, "b", 4)
    eventually(lambda: dispatcher.counters.delivered == 8, "8 pushes acked", timeout=60)

    def order(key: str) -> list[str]:
        seen = [
            body.decode() for _, h, body in sink.requests if h["x-goog-pubsub-ordering-key"] == key
        ]
        return list(dict.fromkeys(seen))  # first delivery of each

    assert order("a") == first_a and order("b") == first_b
    a_bodies = [
        body.decode() for _, h, body in sink.requests if h["x-goog-pubsub-ordering-key"] == "a"
    ]
    assert a_bodies[:3] == ["a-0"] * 3, "a-1 was not pushed before a-0 succeeded"
    b_done = max(t for t, h, _ in sink.requests if h["x-goog-pubsub-ordering-key"] == "b")
    a_done = max(t for t, h, _ in sink.requests if h["x-goog-pubsub-ordering-key"] == "a")
    assert b_done < a_done, "key b was not held up by key a's retries"
