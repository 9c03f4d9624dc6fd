"""What a function needs from outside, built from the environment on first use and injected
into the service code: the object store, the event bus, the token secret (and the previous one
during a rotation, and the longest token lifetime taken), a clock, and who may push events
(Pub/Sub's OIDC tokens; None: not checked). `check_env` refuses an unsafe configuration before
a function starts serving."""

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
from microfl.tokens import (
    MAX_TOKEN_TTL,
    max_ttl_from_env,
    previous_secret_from_env,
    secret_from_env,
)

__all__ = ["Backends", "backends_from_env", "bus_from_env", "check_env"]

EVENT_TARGETS = ("aggregate", "finalize")  # take pushed events; ingest takes clients' requests


@dataclass
class Backends:
    store: ObjectStore
    bus: EventBus
    secret: bytes = b""
    clock: Callable[[], float] = field(default=time.time)
    push_auth: PushAuth | None = None
    secret_previous: bytes | None = None
    max_token_ttl: int = MAX_TOKEN_TTL


def backends_from_env() -> Backends:
    """MICROFL_STORE, MICROFL_SECRET and the event bus, as the manifests set them: MICROFL_BUS is
    kafka (the default; MICROFL_KAFKA_BOOTSTRAP) or pubsub (MICROFL_PUBSUB_PROJECT)."""
    store = os.environ.get("MICROFL_STORE")
    if not store:
        raise ConfigError("set MICROFL_STORE (file:///path or gs://bucket) for the functions")
    return Backends(
        open_store(store),
        bus_from_env(),
        secret_from_env(),
        faults.clock,
        push_auth_from_env(),
        previous_secret_from_env(),
        max_ttl_from_env(),
    )


def check_env(target: str) -> None:
    """Raise ConfigError for a configuration the function `target` must not run with: a weak or
    placeholder secret, a bad token lifetime, an unknown bus, and on Pub/Sub an event function
    whose pushes nobody checks (MICROFL_PUSH_AUDIENCE and MICROFL_PUSH_INVOKER unset and push
    authentication not switched off with MICROFL_PUSH_AUTH=off, which only the local emulator,
    whose pushes carry no tokens, may do). Builds no clients and connects to nothing."""
    secret_from_env()
    previous_secret_from_env()
    max_ttl_from_env()
    bus_from_env()
    pubsub = os.environ.get("MICROFL_BUS", "kafka") == "pubsub"
    push_auth_from_env(required=pubsub and target in EVENT_TARGETS)


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
