"""What a function needs from outside, built from the environment on first use and injected
into the service code: the object store, the event bus, the token secret and a clock."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from microfl import faults
from microfl.bus import EventBus, KafkaBus
from microfl.errors import ConfigError
from microfl.store import ObjectStore, open_store

__all__ = ["Backends", "backends_from_env"]


@dataclass
class Backends:
    store: ObjectStore
    bus: EventBus
    secret: bytes = b""
    clock: Callable[[], float] = field(default=time.time)


def backends_from_env() -> Backends:
    """MICROFL_STORE, MICROFL_KAFKA_BOOTSTRAP and MICROFL_SECRET, as the manifests set them."""
    store = os.environ.get("MICROFL_STORE")
    bootstrap = os.environ.get("MICROFL_KAFKA_BOOTSTRAP")
    if not store or not bootstrap:
        raise ConfigError(
            "set MICROFL_STORE (file:///path or gs://bucket) and "
            "MICROFL_KAFKA_BOOTSTRAP (host:port,...) for the functions"
        )
    secret = os.environ.get("MICROFL_SECRET", "").encode()
    return Backends(open_store(store), KafkaBus(bootstrap), secret, clock=faults.clock)
