"""Who may push events: on Pub/Sub, aggregate and finalize have public HTTPS endpoints (push
cannot reach cluster-local ones), so each push carries a Google-signed OIDC token for the
subscription's service account, and the function checks it before touching anything.

Set MICROFL_PUSH_AUDIENCE (the push endpoint, the token's audience) and MICROFL_PUSH_INVOKER (the
service account the subscriptions push as); without them (Kafka, local runs) nothing is checked,
since a KafkaSource reaches the functions only from inside the cluster."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import requests

from microfl.errors import ConfigError, Unauthorized, Unavailable
from microfl.tokens import bearer

__all__ = ["GOOGLE_CERTS", "PushAuth", "push_auth_from_env"]

GOOGLE_CERTS = "https://www.googleapis.com/oauth2/v1/certs"  # key id -> PEM certificate
GOOGLE_ISSUERS = ("accounts.google.com", "https://accounts.google.com")
CERTS_TTL = 3600.0  # Google rotates its keys over days; an unknown key id refetches at once


@dataclass
class PushAuth:
    audience: str
    invoker: str
    certs_url: str = GOOGLE_CERTS
    _certs: Mapping[str, str] = field(default_factory=dict, repr=False)
    _fetched: float = field(default=-CERTS_TTL, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

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
        with self._lock:
            stale = time.monotonic() - self._fetched > CERTS_TTL
            if stale or kid not in self._certs:
                try:
                    answer = requests.get(self.certs_url, timeout=10)
                    answer.raise_for_status()
                    self._certs = answer.json()
                except (requests.RequestException, ValueError) as exc:
                    raise Unavailable(
                        f"cannot fetch Google's token keys from {self.certs_url}: {exc}"
                    ) from exc
                self._fetched = time.monotonic()
            return self._certs


def push_auth_from_env() -> PushAuth | None:
    audience = os.environ.get("MICROFL_PUSH_AUDIENCE")
    invoker = os.environ.get("MICROFL_PUSH_INVOKER")
    if not audience and not invoker:
        return None
    if not audience or not invoker:
        raise ConfigError("set both MICROFL_PUSH_AUDIENCE and MICROFL_PUSH_INVOKER, or neither")
    return PushAuth(audience, invoker, os.environ.get("MICROFL_PUSH_CERTS_URL", GOOGLE_CERTS))
