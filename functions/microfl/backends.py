"""What a function needs from outside, built from the environment on first use and injected
into the service code: the object store, the event bus, the token secret, a clock, and who may
push events (Pub/Sub's OIDC tokens; None: not checked)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from microfl import faults
from microfl.bus import EventBus, KafkaBus, PubSubBus
from microfl.errors import ConfigError
from microfl.pushauth import PushAuth, push_auth_from_env
from microfl.store import ObjectStore, open_store

__all__ = ["Backends", "backends_from_env", "bus_from_env"]


@dataclass
class Backends:
    store: ObjectStore
    bus: EventBus
    secret: bytes = b""
    clock: Callable[[], float] = field(default=time.time)
    push_auth: PushAuth | None = None


def backends_from_env() -> Backends:
    """MICROFL_STORE, MICROFL_SECRET and the event bus, as the manifests set them: MICROFL_BUS is
    kafka (the default; MICROFL_KAFKA_BOOTSTRAP) or pubsub (MICROFL_PUBSUB_PROJECT)."""
    store = os.environ.get("MICROFL_STORE")
    if not store:
        raise ConfigError("set MICROFL_STORE (file:///path or gs://bucket) for the functions")
    secret = os.environ.get("MICROFL_SECRET", "").encode()
    return Backends(open_store(store), bus_from_env(), secret, faults.clock, push_auth_from_env())


def bus_from_env() -> EventBus:
    kind = os.environ.get("MICROFL_BUS", "kafka")
    if kind == "kafka":
        bootstrap = os.environ.get("MICROFL_KAFKA_BOOTSTRAP")
        if not bootstrap:
            raise ConfigError("set MICROFL_KAFKA_BOOTSTRAP (host:port,...) or MICROFL_BUS=pubsub")
        return KafkaBus(bootstrap)
    if kind == "pubsub":
        project = os.environ.get("MICROFL_PUBSUB_PROJECT")
        if not project:
            raise ConfigError(
                "MICROFL_BUS=pubsub needs MICROFL_PUBSUB_PROJECT (the topics' project)"
            )
        return PubSubBus(project)
    raise ConfigError(f"MICROFL_BUS={kind!r}: use kafka or pubsub")
