"""Who may push events: on Pub/Sub, aggregate and finalize have public HTTPS endpoints (push
cannot reach cluster-local ones), so each push carries a Google-signed OIDC token for the
subscription's service account, and the function checks it before touching anything.

Set MICROFL_PUSH_AUDIENCE (the push endpoint, the token's audience) and MICROFL_PUSH_INVOKER (the
service account the subscriptions push as); without them nothing is checked, which is right on
Kafka (a KafkaSource reaches the functions only from inside the cluster) and wrong on Pub/Sub:
there aggregate and finalize refuse to start without them (backends.check_env) unless
MICROFL_PUSH_AUTH=off says the pushes come from the local emulator, which sends no tokens.

Google's keys are fetched once an hour, and at most once per `refetch_interval` for a key id
they do not hold: an unauthenticated caller chooses the key id, so junk ids cost one fetch per
interval at most, and a token with a known key id never waits for a fetch in progress."""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import requests

from microfl.errors import ConfigError, Unauthorized, Unavailable
from microfl.tokens import bearer

__all__ = ["GOOGLE_CERTS", "PushAuth", "push_auth_from_env"]

LOG = logging.getLogger(__name__)

GOOGLE_CERTS = "https://www.googleapis.com/oauth2/v1/certs"  # key id -> PEM certificate
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
CERTS_TTL = 3600.0  # Google publishes a key well before signing with it and rotates over days
REFETCH_INTERVAL = 60.0  # at most one fetch per minute, whatever key ids callers send


@dataclass
class PushAuth:
    audience: str
    invoker: str
    certs_url: str = GOOGLE_CERTS
    refetch_interval: float = REFETCH_INTERVAL
    _certs: Mapping[str, str] = field(default_factory=dict, repr=False)
    _fetched: float = field(default=-math.inf, repr=False)  # last successful fetch
    _attempted: float = field(default=-math.inf, repr=False)  # last fetch started
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # the fields only
    _fetching: threading.Lock = field(default_factory=threading.Lock, repr=False)  # one fetch

    def verify(self, authorization: str | None) -> None:
        """Return if the header holds a valid token for this audience and invoker, else raise
        Unauthorized (401: Pub/Sub retries, then dead-letters the message)."""
        from google.auth import exceptions, jwt

        token = bearer(authorization)
        if token is None:
            raise Unauthorized("events must be pushed with the subscription's OIDC token")
        try:
            kid = jwt.decode_header(token).get("kid")
            claims = jwt.decode(token, certs=self._keys(kid), audience=self.audience)
        except (ValueError, exceptions.GoogleAuthError) as exc:
            raise Unauthorized("push token rejected: not a valid token for this endpoint") from exc
        if claims.get("iss") not in GOOGLE_ISSUERS:
            raise Unauthorized(f"push token issued by {claims.get('iss')!r}, not Google")
        if claims.get("email") != self.invoker or not claims.get("email_verified"):
            raise Unauthorized(
                f"push token is for {claims.get('email')!r}, not the push subscription's account"
            )

    def _keys(self, kid: str | None) -> Mapping[str, str]:
        """The certificates to check a token with key id `kid` against. Only a caller that
        starts a fetch waits for it; the lock guarding the fields is never held across HTTP."""
        with self._lock:
            certs, fetched, attempted = self._certs, self._fetched, self._attempted
        now = time.monotonic()
        if kid in certs and now - fetched <= CERTS_TTL:
            return certs
        may_fetch = now - attempted >= self.refetch_interval
        if may_fetch and self._fetching.acquire(blocking=False):
            try:
                return self._fetch(kid)
            finally:
                self._fetching.release()
        if kid in certs:
            return certs  # stale, and refreshed by whoever fetches next
        if not certs and self._fetching.acquire(timeout=15):
            self._fetching.release()  # first keys of this instance: every caller needs them
            with self._lock:
                certs = self._certs
            if kid in certs:
                return certs
        if not certs:
            raise Unavailable("Google's token keys are not fetched yet; retry in a moment")
        raise Unauthorized(f"push token signed with key {kid!r}, not one of Google's")

    def _fetch(self, kid: str | None) -> Mapping[str, str]:
        with self._lock:
            self._attempted = time.monotonic()
            old = self._certs
        try:
            answer = requests.get(self.certs_url, timeout=10)
            answer.raise_for_status()
            certs = answer.json()
            if not isinstance(certs, dict):
                raise ValueError("the keys are not a JSON object")
        except (requests.RequestException, ValueError) as exc:
            if kid in old:  # Google's keys live for days: the ones held still verify
                LOG.warning("cannot refresh Google's token keys from %s: %s", self.certs_url, exc)
                return old
            raise Unavailable(
                f"cannot fetch Google's token keys from {self.certs_url}: {exc}"
            ) from exc
        with self._lock:
            self._certs, self._fetched = certs, time.monotonic()
        return certs


def push_auth_from_env(required: bool = False) -> PushAuth | None:
    """The push check the environment asks for; None for none. `required`: the function takes
    Pub/Sub pushes, so no check is a ConfigError unless MICROFL_PUSH_AUTH=off."""
    audience = os.environ.get("MICROFL_PUSH_AUDIENCE")
    invoker = os.environ.get("MICROFL_PUSH_INVOKER")
    switch = os.environ.get("MICROFL_PUSH_AUTH", "on").lower()
    if switch not in ("on", "off"):
        raise ConfigError(f"MICROFL_PUSH_AUTH={switch!r}: use on (the default) or off")
    if switch == "off":
        if audience or invoker:
            raise ConfigError(
                "MICROFL_PUSH_AUTH=off but MICROFL_PUSH_AUDIENCE or MICROFL_PUSH_INVOKER is set: "
                "unset MICROFL_PUSH_AUTH to check the pushes"
            )
        return None
    if not audience and not invoker:
        if required:
            raise ConfigError(
                "MICROFL_BUS=pubsub: aggregate and finalize take pushes from the internet, so "
                "set MICROFL_PUSH_AUDIENCE (this function's push endpoint) and "
                "MICROFL_PUSH_INVOKER (the service account the subscriptions push as), as "
                "infra/knative-pubsub does; only with the local Pub/Sub emulator set "
                "MICROFL_PUSH_AUTH=off"
            )
        return None
    if not audience or not invoker:
        raise ConfigError("set both MICROFL_PUSH_AUDIENCE and MICROFL_PUSH_INVOKER, or neither")
    return PushAuth(audience, invoker, os.environ.get("MICROFL_PUSH_CERTS_URL", GOOGLE_CERTS))
