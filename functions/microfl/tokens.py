"""Signed bearer tokens: a client's token admits it to one job until it expires.

    mfl1.<base64url(JSON payload)>.<base64url(HMAC-SHA256(secret, "mfl1." + payload part))>

The payload is `{"adm": bool, "exp": unix seconds, "job": id, "sub": client id or "admin"}`.
The signature covers the payload's text as sent and is compared in its canonical encoding, so no
two different strings verify. An admin token's job may be "*", meaning every job. Anything
wrong with the token's form is `Unauthorized`; a well-signed token for another job, or an
expired one, is `Forbidden`.
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

__all__ = ["Claims", "bearer", "issue_token", "secret_from_env", "valid_id", "verify_token"]

VERSION = "mfl1"
MAX_TOKEN_LENGTH = 2048
ANY_JOB = "*"
MIN_SECRET_LENGTH = 16
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
    secret = os.environ.get("MICROFL_SECRET", "")
    if len(secret) < MIN_SECRET_LENGTH:
        state = "is not set" if not secret else f"has {len(secret)} characters"
        raise ConfigError(
            f"MICROFL_SECRET {state}; set it to a random string of at least "
            f"{MIN_SECRET_LENGTH} characters, e.g. "
            "`python -c 'import secrets; print(secrets.token_urlsafe(32))'`"
        )
    return secret.encode("utf-8")


def issue_token(
    secret: bytes,
    job: str,
    client: str | None = None,
    *,
    admin: bool = False,
    ttl: int = 86400,
    now: float | None = None,
) -> str:
    _check_secret(secret)
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
    expires = int(time.time() if now is None else now) + int(ttl)
    payload = {"adm": admin, "exp": expires, "job": job, "sub": "admin" if admin else client}
    body = _b64encode(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode())
    return f"{VERSION}.{body}.{_sign(secret, body)}"


def verify_token(secret: bytes, token: str | None, job: str, now: float | None = None) -> Claims:
    _check_secret(secret)
    if not token:
        raise Unauthorized(
            "no token; send 'Authorization: Bearer <token>' with the token "
            "the operator issued for this job (microfl token issue)"
        )
    claims = _claims(secret, token)
    if claims.job != job and not (claims.admin and claims.job == ANY_JOB):
        raise Forbidden(
            f"this token is for job {claims.job!r}, not {job!r}; "
            f"use the token for {job!r} or {_NEW_TOKEN}"
        )
    if (time.time() if now is None else now) >= claims.expires:
        raise Forbidden(f"token expired at {_utc(claims.expires)}; {_NEW_TOKEN}")
    return claims


def bearer(header_value: str | None) -> str | None:
    """The token in an `Authorization: Bearer <token>` value; None for none or another scheme."""
    if not header_value:
        return None
    parts = header_value.strip().split(None, 1)
    if len(parts) != 2 or parts[0].lower() != "bearer":
        return None
    return parts[1].strip() or None


def _claims(secret: bytes, token: str) -> Claims:
    if len(token) > MAX_TOKEN_LENGTH or not token.isascii():
        raise _malformed()
    parts = token.split(".")
    if len(parts) != 3 or parts[0] != VERSION or not all(_B64URL.fullmatch(p) for p in parts[1:]):
        raise _malformed()
    _, body, signature = parts
    # Compare canonical encodings, not decoded bytes: base64 ignores a last character's spare bits.
    if not hmac.compare_digest(_sign(secret, body).encode(), signature.encode()):
        raise Unauthorized(
            "token signature does not match; it was altered or signed with "
            f"another secret: {_NEW_TOKEN}"
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


def _check_secret(secret: bytes) -> None:
    if not isinstance(secret, bytes) or not secret:
        raise ConfigError("the token secret must be non-empty bytes (see MICROFL_SECRET)")


def _sign(secret: bytes, body: str) -> str:
    mac = hmac.new(secret, f"{VERSION}.{body}".encode(), hashlib.sha256).digest()
    return _b64encode(mac)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _utc(ts: int) -> str:
    try:
        return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, OSError, ValueError):
        return f"unix time {ts}"
