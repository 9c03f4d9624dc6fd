"""Signed bearer tokens: a client's token admits it to one job until it expires.

    mfl2.<key id>.<base64url(JSON payload)>.<base64url(HMAC-SHA256(secret, "mfl2.<key id>." +
    payload part))>

The payload is `{"adm": bool, "exp": unix seconds, "job": id, "sub": client id or "admin"}`.
The key id names the secret that signed (a hash of it, see `key_id`), so during a rotation the
verifier picks the current or the previous secret (MICROFL_SECRET_PREVIOUS) without trying both.
Tokens of the first format (`mfl1.<payload>.<signature>`, no key id) still verify, against the
current and then the previous secret, so that clients holding one keep working until it expires.
The signature covers the payload's text as sent and is compared in its canonical encoding, so no
two different strings verify. An admin token's job may be "*", meaning every job. Anything
wrong with the token's form is `Unauthorized`; a well-signed token for another job, an expired
one, or one that lives longer than the platform's maximum lifetime is `Forbidden`.
Secrets are at least 32 bytes and never a known placeholder (`check_secret`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import re
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from microfl.errors import ConfigError, Forbidden, Unauthorized

__all__ = [
    "Claims",
    "bearer",
    "check_secret",
    "issue_token",
    "key_id",
    "max_ttl_from_env",
    "previous_secret_from_env",
    "secret_from_env",
    "valid_id",
    "verify_admin",
    "verify_token",
]

VERSION = "mfl2"
LEGACY_VERSION = "mfl1"  # no key id; still verified (see the module docstring)
MAX_TOKEN_LENGTH = 2048
ANY_JOB = "*"
MIN_SECRET_LENGTH = 32  # bytes
MAX_TOKEN_TTL = 30 * 86400  # seconds; MICROFL_MAX_TOKEN_TTL overrides it
# Values that ship in examples and templates: anyone can read them, so they sign nothing.
PLACEHOLDERS = (
    "replace-me",
    "replace_me",
    "replaceme",
    "changeme",
    "change-me",
    "change_me",
    "placeholder",
    "your-secret",
    "example-secret",
    "insert-secret",
)
_MAKE_ONE = "make one with `openssl rand -hex 32`"
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_B64URL = re.compile(r"[A-Za-z0-9_-]+")
_NEW_TOKEN = "ask the operator for a new one (microfl token issue)"


@dataclass(frozen=True)
class Claims:
    job: str
    client: str | None
    admin: bool
    expires: int


def valid_id(value: str) -> bool:
    """Job and client ids end up as object-store key segments, so no separators or traversal."""
    return isinstance(value, str) and bool(_ID.fullmatch(value)) and ".." not in value


def secret_from_env() -> bytes:
    """MICROFL_SECRET, the key that signs new tokens (and verifies them)."""
    secret = os.environ.get("MICROFL_SECRET", "")
    if not secret:
        raise ConfigError(f"MICROFL_SECRET is not set; set it to a random secret: {_MAKE_ONE}")
    return check_secret(secret.encode("utf-8"), "MICROFL_SECRET")


def previous_secret_from_env() -> bytes | None:
    """MICROFL_SECRET_PREVIOUS during a rotation: tokens it signed still verify, nothing new is
    signed with it. None when unset."""
    secret = os.environ.get("MICROFL_SECRET_PREVIOUS", "")
    if not secret:
        return None
    previous = check_secret(secret.encode("utf-8"), "MICROFL_SECRET_PREVIOUS")
    if previous == os.environ.get("MICROFL_SECRET", "").encode("utf-8"):
        raise ConfigError(
            "MICROFL_SECRET_PREVIOUS equals MICROFL_SECRET; set it to the secret being "
            "replaced, or unset it"
        )
    return previous


def max_ttl_from_env() -> int:
    """MICROFL_MAX_TOKEN_TTL: the longest lifetime, in seconds, of a token the platform takes."""
    raw = os.environ.get("MICROFL_MAX_TOKEN_TTL", "")
    if not raw:
        return MAX_TOKEN_TTL
    if not raw.isdigit() or not 0 < int(raw) <= 10 * 365 * 86400:
        raise ConfigError(
            f"MICROFL_MAX_TOKEN_TTL={raw!r}: give a number of seconds between 1 and "
            f"{10 * 365 * 86400} (the default is {MAX_TOKEN_TTL}, 30 days)"
        )
    return int(raw)


def check_secret(secret: bytes, name: str = "the token secret") -> bytes:
    """The secret if it can sign tokens: at least 32 bytes, not a known placeholder, not one
    character repeated. Else ConfigError saying how to make one."""
    if not isinstance(secret, bytes) or not secret:
        raise ConfigError(f"{name} must be non-empty bytes (see MICROFL_SECRET); {_MAKE_ONE}")
    lowered = secret.decode("utf-8", "replace").lower()
    if any(marker in lowered for marker in PLACEHOLDERS):
        raise ConfigError(
            f"{name} is a placeholder from an example, which anyone can read; {_MAKE_ONE} "
            "(on Kubernetes: kubectl -n microfl create secret generic microfl-secret "
            '--from-literal=MICROFL_SECRET="$(openssl rand -hex 32)")'
        )
    if len(secret) < MIN_SECRET_LENGTH:
        raise ConfigError(
            f"{name} has {len(secret)} bytes; it needs at least {MIN_SECRET_LENGTH}: {_MAKE_ONE}"
        )
    if len(set(secret)) < 8:
        raise ConfigError(f"{name} is not random (fewer than 8 distinct bytes); {_MAKE_ONE}")
    return secret


def key_id(secret: bytes) -> str:
    """The id tokens carry for the secret that signed them: 8 characters of a hash of it,
    which tells the verifier which secret to use and nothing about the secret itself."""
    digest = hashlib.sha256(b"microfl token key id\0" + secret).digest()
    return _b64encode(digest[:6])


def issue_token(
    secret: bytes,
    job: str,
    client: str | None = None,
    *,
    admin: bool = False,
    ttl: int = 86400,
    now: float | None = None,
    max_ttl: int = MAX_TOKEN_TTL,
) -> str:
    check_secret(secret)
    if admin == (client is not None):
        raise ValueError(
            "a token is either for one client or an admin token: "
            "pass client=<id> or admin=True, not both or neither"
        )
    if not (valid_id(job) or (admin and job == ANY_JOB)):
        what = "a job id or '*'" if admin else "a job id"
        raise ValueError(
            f"job {job!r} is not {what}: 1-64 characters of letters, digits, "
            "'.', '_', '-', starting with a letter or digit, without '..'"
        )
    if client is not None and not valid_id(client):
        raise ValueError(
            f"client {client!r} is not a client id: 1-64 characters of letters, "
            "digits, '.', '_', '-', starting with a letter or digit, without '..'"
        )
    if ttl <= 0:
        raise ValueError(f"ttl must be a positive number of seconds, not {ttl}")
    if ttl > max_ttl:
        raise ValueError(
            f"ttl {ttl}s is longer than the platform takes ({max_ttl}s, MICROFL_MAX_TOKEN_TTL); "
            "issue a shorter-lived token and a new one when it expires"
        )
    expires = int(time.time() if now is None else now) + int(ttl)
    payload = {"adm": admin, "exp": expires, "job": job, "sub": "admin" if admin else client}
    body = _b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    head = f"{VERSION}.{key_id(secret)}"
    return f"{head}.{body}.{_sign(secret, f'{head}.{body}')}"


def verify_token(
    secret: bytes,
    token: str | None,
    job: str,
    now: float | None = None,
    *,
    previous: bytes | None = None,
    max_ttl: int = MAX_TOKEN_TTL,
) -> Claims:
    """The token's claims if it admits its holder to `job` now; `previous` is the secret being
    rotated out (its tokens still verify)."""
    check_secret(secret)
    if not token:
        raise Unauthorized(
            "no token; send 'Authorization: Bearer <token>' with the token "
            "the operator issued for this job (microfl token issue)"
        )
    claims = _claims((secret, previous) if previous else (secret,), token)
    if claims.job != job and not (claims.admin and claims.job == ANY_JOB):
        raise Forbidden(
            f"this token is for job {claims.job!r}, not {job!r}; "
            f"use the token for {job!r} or {_NEW_TOKEN}"
        )
    t = time.time() if now is None else now
    if t >= claims.expires:
        raise Forbidden(f"token expired at {_utc(claims.expires)}; {_NEW_TOKEN}")
    if claims.expires - t > max_ttl:
        raise Forbidden(
            f"token expires at {_utc(claims.expires)}, later than the platform's maximum "
            f"token lifetime of {max_ttl}s allows; {_NEW_TOKEN}"
        )
    return claims


def verify_admin(
    secret: bytes,
    token: str | None,
    now: float | None = None,
    *,
    previous: bytes | None = None,
    max_ttl: int = MAX_TOKEN_TTL,
) -> Claims:
    """An admin token's claims if it is valid now, whatever its job ("*" or one): the operator
    console signs its admins in with one and shows them the jobs it names."""
    check_secret(secret)
    claims = _claims((secret, previous) if previous else (secret,), token or "")
    if not claims.admin:
        raise Forbidden(f"this is a client's token, not an admin token; {_NEW_TOKEN} --admin")
    return verify_token(secret, token, claims.job, now, previous=previous, max_ttl=max_ttl)


def bearer(header_value: str | None) -> str | None:
    """The token in an `Authorization: Bearer <token>` value; None for none or another scheme."""
    if not header_value:
        return None
    parts = header_value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def _claims(secrets: tuple[bytes, ...], token: str) -> Claims:
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise _malformed()
    parts = token.split(".")
    if not all(_B64URL.fullmatch(p) for p in parts[1:]):
        raise _malformed()
    if parts[0] == VERSION and len(parts) == 4:
        # The key id picks the one secret to check; an unknown id matches none.
        candidates = [s for s in secrets if hmac.compare_digest(key_id(s), parts[1])]
    elif parts[0] == LEGACY_VERSION and len(parts) == 3:
        candidates = list(secrets)
    else:
        raise _malformed()
    *_, body, signature = parts
    signed, mac = token.rpartition(".")[0], signature.encode()
    # Compare canonical encodings, not decoded bytes: base64 ignores a last character's spare bits.
    if not any(hmac.compare_digest(_sign(s, signed).encode(), mac) for s in candidates):
        raise Unauthorized(
            "token signature does not match; it was altered or signed with "
            f"another secret (or one rotated out): {_NEW_TOKEN}"
        )
    try:
        payload: Any = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (ValueError, RecursionError) as exc:  # binascii, unicode, JSON; deep nesting
        raise _malformed() from exc
    if not isinstance(payload, dict):
        raise _malformed()
    job, sub, adm, exp = (payload.get(k) for k in ("job", "sub", "adm", "exp"))
    if not (
        isinstance(adm, bool)
        and isinstance(exp, int)
        and not isinstance(exp, bool)
        and isinstance(job, str)
        and isinstance(sub, str)
    ):
        raise _malformed()
    if adm and sub == "admin" and (job == ANY_JOB or valid_id(job)):
        return Claims(job=job, client=None, admin=True, expires=exp)
    if not adm and valid_id(job) and valid_id(sub):
        return Claims(job=job, client=sub, admin=False, expires=exp)
    raise _malformed()


def _malformed() -> Unauthorized:
    return Unauthorized(f"malformed token; send the token exactly as issued, or {_NEW_TOKEN}")


def _sign(secret: bytes, signed: str) -> str:
    """The MAC over everything before the signature part (version, key id, payload)."""
    return _b64encode(hmac.new(secret, signed.encode(), hashlib.sha256).digest())


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _utc(ts: int) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix time {ts}"
