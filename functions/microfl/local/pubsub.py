"""The Pub/Sub transport of the local platform: the emulator, run as a real process on 127.0.0.1,
and the topics and subscriptions the deployment creates (infra/terraform/pubsub.tf holds the
same settings; tests/test_infra.py checks that they agree).

The emulator is Google's pstest fake served over gRPC by a small Go program
(infra/local/pubsub/main.go), built from Go modules into .cache/bin on first use with the
machine's Go or the project's pinned one (microfl.local.toolchains). Clients reach it
through PUBSUB_EMULATOR_HOST."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from microfl.events import PARTIAL_REQUESTED, TOPICS, UPDATE_ACCEPTED
from microfl.local import toolchains
from microfl.local.procs import HOST, ServerProcess, repo_root

__all__ = [
    "PROJECT",
    "SUBSCRIPTIONS",
    "PubSubEmulator",
    "PushSubscription",
    "emulator_binary",
    "emulator_env",
    "emulator_path",
    "ensure_pubsub",
]

PROJECT = "microfl-local"  # the emulator accepts any project id


@dataclass(frozen=True)
class PushSubscription:
    """A push subscription to one function, with Pub/Sub's retry policy (exponential backoff
    between min and max) and dead-letter policy (after max_attempts deliveries the message goes
    to `{topic}.dlq`). The push request times out after ack_deadline seconds."""

    name: str
    topic: str
    function: str
    ordered: bool
    ack_deadline: int = 300
    min_backoff: float = 1.0
    max_backoff: float = 60.0
    max_attempts: int = 11  # the KafkaSources' 10 retries after the first attempt

    @property
    def dead_letter_topic(self) -> str:
        return f"{self.topic}.dlq"

    def backoff(self, attempt: int) -> float:
        """Seconds before delivery attempt+1 after attempt failed (1-based)."""
        return float(min(self.max_backoff, self.min_backoff * 2 ** (attempt - 1)))


# What the KafkaSources in knative/sources.yaml do: aggregate in parallel, finalize in order per
# job (ordering key = job, as the Kafka key is).
SUBSCRIPTIONS = (
    PushSubscription("microfl-aggregate", TOPICS[PARTIAL_REQUESTED], "aggregate", ordered=False),
    PushSubscription("microfl-finalize", TOPICS[UPDATE_ACCEPTED], "finalize", ordered=True),
)


def emulator_path() -> Path:
    """Where the emulator built from the current source lives (named by the source's hash)."""
    src = repo_root() / "infra" / "local" / "pubsub"
    digest = hashlib.sha256(
        b"".join((src / n).read_bytes() for n in ("go.mod", "go.sum", "main.go"))
    ).hexdigest()[:12]
    return repo_root() / ".cache" / "bin" / f"microfl-pubsub-emulator-{digest}"


def emulator_binary(quiet: bool = False) -> Path:
    """The emulator's binary, built with Go on first use and whenever its source changes."""
    src = repo_root() / "infra" / "local" / "pubsub"
    binary = emulator_path()
    if binary.is_file():
        return binary
    go = toolchains.go()
    if not quiet:
        print(
            f"building the Pub/Sub emulator into {binary} (first run only) with {go.describe()}",
            file=sys.stderr,
        )
    binary.parent.mkdir(parents=True, exist_ok=True)
    tmp = binary.with_suffix(".tmp")
    done = subprocess.run(
        [str(go.path), "build", "-o", str(tmp), "."],
        cwd=src,
        capture_output=True,
        text=True,
        env=go.environ(),
    )
    if done.returncode != 0:
        raise RuntimeError(f"building the Pub/Sub emulator failed:\n{done.stderr[-3000:]}")
    tmp.replace(binary)
    return binary


@dataclass
class PubSubEmulator(ServerProcess):
    workdir: Path
    port: int = 0
    proc: subprocess.Popen | None = None

    @property
    def what(self) -> str:
        return "Pub/Sub emulator"

    @property
    def host(self) -> str:
        """host:port, the value of PUBSUB_EMULATOR_HOST."""
        return f"{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        return Path(self.workdir) / "pubsub-emulator.log"

    def argv(self) -> list[str]:
        return [str(emulator_binary()), "-host", HOST, "-port", str(self.port)]

    def ready(self) -> bool:
        with socket.create_connection((HOST, self.port), timeout=1):
            return True


@contextmanager
def emulator_env(host: str) -> Iterator[None]:
    """PUBSUB_EMULATOR_HOST set for the clients made inside the block."""
    old = os.environ.get("PUBSUB_EMULATOR_HOST")
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("PUBSUB_EMULATOR_HOST", None)
        else:
            os.environ["PUBSUB_EMULATOR_HOST"] = old


def ensure_pubsub(
    host: str, project: str, sinks: dict[str, str], subscriptions: tuple[PushSubscription, ...]
) -> None:
    """Create the topics, the dead-letter topics with a pull subscription each (Pub/Sub drops
    messages of a topic without subscriptions) and the push subscriptions to `sinks` (function
    -> URL), as infra/terraform/pubsub.tf does; what exists already is left as it is."""
    from google.api_core.exceptions import AlreadyExists
    from google.cloud import pubsub_v1

    with emulator_env(host):
        publisher = pubsub_v1.PublisherClient()
        subscriber = pubsub_v1.SubscriberClient()
    topics = set(TOPICS.values()) | {
        t for s in subscriptions for t in (s.topic, s.dead_letter_topic)
    }

    def create(call: Any, request: dict[str, Any]) -> None:
        with suppress(AlreadyExists):
            call(request=request)

    for topic in sorted(topics):
        create(publisher.create_topic, {"name": publisher.topic_path(project, topic)})
    for sub in subscriptions:
        dlq = publisher.topic_path(project, sub.dead_letter_topic)
        create(
            subscriber.create_subscription,
            {"name": subscriber.subscription_path(project, f"{sub.name}-dlq"), "topic": dlq},
        )
        create(
            subscriber.create_subscription,
            {
                "name": subscriber.subscription_path(project, sub.name),
                "topic": publisher.topic_path(project, sub.topic),
                "push_config": {
                    "push_endpoint": sinks[sub.function],
                    "no_wrapper": {"write_metadata": True},
                },
                "ack_deadline_seconds": sub.ack_deadline,
                "enable_message_ordering": sub.ordered,
                "retry_policy": {
                    "minimum_backoff": _duration(sub.min_backoff),
                    "maximum_backoff": _duration(sub.max_backoff),
                },
                "dead_letter_policy": {
                    "dead_letter_topic": dlq,
                    "max_delivery_attempts": sub.max_attempts,
                },
            },
        )
    publisher.transport.close()
    subscriber.close()


def _duration(seconds: float) -> Any:
    from google.protobuf.duration_pb2 import Duration

    return Duration(seconds=int(seconds), nanos=round(seconds % 1 * 1e9))
