"""An in-process driver for the streaming tree: the three services called directly on an
in-memory store that counts its operations, events queued by hand (delivered late, twice or
never), crashes at failpoints simulated by an exception, and a fake clock."""

from __future__ import annotations

import builtins
import io
import random
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

from fl import SECRET
from microfl import aggregate, finalize, ingest
from microfl.backends import Backends
from microfl.bus import MemoryBus
from microfl.errors import MicroFLError, http_error
from microfl.jobs import JobSpec, create_job
from microfl.serde import Event, tensors_to_safetensors
from microfl.store import ObjectStore
from microfl.tokens import issue_token

T0 = 1_767_225_600.0


class Crash(BaseException):
    """A SIGKILL at a failpoint: nothing after it runs, the event is redelivered later."""


class DictStore(ObjectStore):
    """Create-only objects in a dict, every call counted (unit tests only)."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}
        self.ops: Counter[str] = Counter()
        self.url = f"mem://{id(self)}"
        self.on_create: Callable[[str], None] | None = None

    def create(self, key: str, data: bytes) -> bool:
        self.ops["create"] += 1
        if key in self.objects:
            return False
        if self.on_create:
            self.on_create(key)
        self.objects[key] = bytes(data)
        return True

    def read(self, key: str) -> bytes | None:
        self.ops["read"] += 1
        return self.objects.get(key)

    def exists(self, key: str) -> bool:
        self.ops["exists"] += 1
        return key in self.objects

    def list(self, prefix: str) -> builtins.list[str]:
        self.ops["list"] += 1
        return sorted(k for k in self.objects if k.startswith(prefix))

    def delete(self, key: str) -> None:
        self.ops["delete"] += 1
        self.objects.pop(key, None)

    def children(self, prefix: str) -> builtins.list[str]:
        self.ops["list"] += 1
        return sorted(
            {k[len(prefix) :].split("/")[0] for k in self.objects if k.startswith(prefix)}
        )


class Clock:
    def __init__(self) -> None:
        self.now = T0 + 1

    def __call__(self) -> float:
        return self.now


class Play:
    """One job on a DictStore; `crash_at` arms failpoints (name -> which hit raises Crash)."""

    def __init__(
        self, model: dict[str, np.ndarray], monkeypatch: pytest.MonkeyPatch, **options: object
    ) -> None:
        self.store = DictStore()
        self.bus = MemoryBus()
        self.clock = Clock()
        self.b = Backends(self.store, self.bus, SECRET.encode(), self.clock)
        self.spec = JobSpec.for_model("job", model, created_at=T0, **options)  # type: ignore[arg-type]
        create_job(self.store, self.spec, tensors_to_safetensors(model))
        self.queue: list[Event] = []
        self.armed: dict[str, int] = {}
        self.fired: list[str] = []
        for module in (aggregate, finalize, ingest):
            monkeypatch.setattr(module, "failpoint", self._failpoint)
        monkeypatch.setattr(ingest, "SEAL_WAIT", 0.0)
        monkeypatch.setattr(aggregate, "SEAL_WAIT", 0.0)

    def _failpoint(self, name: str) -> None:
        if name in self.armed:
            self.armed[name] -= 1
            if self.armed[name] == 0:
                del self.armed[name]
                self.fired.append(name)
                raise Crash(name)

    def post(self, r: int, client: str, update: dict[str, np.ndarray], n: int) -> int:
        """The HTTP status the client would see (0: the instance died)."""
        body = tensors_to_safetensors(update, {"num_examples": str(n)})
        token = issue_token(SECRET.encode(), "job", client, now=self.clock())
        try:
            status, _ = ingest.post_update(
                self.b, "job", r, token, io.BytesIO(body).read, len(body)
            )
        except Crash:
            status = 0
        except MicroFLError as exc:
            status = http_error(exc)[0]
        self.take()
        return status

    def take(self) -> None:
        self.queue += [e for topic, e, _ in self.bus.events if topic != "microfl.rounds"]
        self.bus.events.clear()

    def deliver(self, event: Event) -> bool:
        """False when the handler failed (crash or 5xx): the delivery retries it later."""
        service = aggregate if event.type.startswith("io.microfl.partial.requested") else finalize
        try:
            service.handle(self.b, event)
            ok = True
        except Crash:
            ok = False
        except MicroFLError as exc:  # 5xx is retried; a poison event is dead-lettered
            ok = http_error(exc)[0] < 500
        self.take()
        return ok

    def step(self, rng: random.Random | None, drop: float = 0.0, dup: float = 0.0) -> None:
        """Deliver one queued event (the first, or a random one), maybe dropped or twice."""
        event = self.queue.pop(rng.randrange(len(self.queue)) if rng else 0)
        if rng and rng.random() < drop:
            return
        for _ in range(2 if rng and rng.random() < dup else 1):
            if not self.deliver(event):
                self.queue.append(event)  # retried (at-least-once delivery)
                return

    def ping(self, at: float) -> None:
        self.clock.now = at
        self.deliver(Event("dev.knative.sources.ping", "/ping", f"ping-{at}"))
