"""The operator console's HTTP edge (FUNCTION_TARGET=console): admin sign-in, the session
cookie, the security headers every answer carries, and the read-only pages.

An admin sign-in posts an admin token once (microfl.tokens.verify_admin); the answer is a
session cookie `HMAC(key, payload)` with a key derived from MICROFL_SECRET (so a session never
passes as a token, nor a token as a session), HttpOnly, SameSite=Strict, Secure over https,
expiring with the token or after SESSION_TTL, whichever comes first. Without a valid session
only the sign-in page and the static assets are served: everything else is a 401 showing the
sign-in form. Rotating MICROFL_SECRET signs everyone out. Besides sign-in and sign-out, every
path answers GET (and HEAD) only; nothing here writes to storage."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import flask

from microfl import consolepages as pages
from microfl import consoleview as view
from microfl import logs
from microfl.errors import BadRequest, MicroFLError, http_error
from microfl.store import ObjectStore, open_store
from microfl.tokens import (
    ANY_JOB,
    max_ttl_from_env,
    previous_secret_from_env,
    secret_from_env,
    verify_admin,
)

__all__ = ["COOKIE", "SESSION_TTL", "configure", "handle", "not_found", "session_cookie"]

LOG = logging.getLogger(__name__)
COOKIE = "microfl_console"
SESSION_TTL = 12 * 3600  # seconds; a token that expires sooner ends the session sooner
MAX_FORM_BYTES = 8192  # a sign-in form is a token (at most 2 kB) and a field name
HEADERS = {
    # Scripts and styles from the console's own /assets only: no inline script, no CDN.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; object-src 'none'; base-uri 'none'; form-action 'self'; "
    "frame-ancestors 'none'",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
}
_JOB = r"(?P<job>[A-Za-z0-9][A-Za-z0-9._-]{0,63})"
ROUTES: list[tuple[str, str]] = [
    (r"/", "jobs"),
    (r"/fragments/jobs", "jobs_fragment"),
    (rf"/jobs/{_JOB}", "job"),
    (rf"/fragments/jobs/{_JOB}", "job_fragment"),
    (rf"/jobs/{_JOB}/models/(?P<version>[0-9]{{1,9}})", "model"),
]


@dataclass
class _Config:
    store: ObjectStore
    secret: bytes
    previous: bytes | None
    max_ttl: int
    clock: Callable[[], float]


_config: _Config | None = None
_lock = threading.Lock()


def configure(
    store: ObjectStore | None,
    secret: bytes = b"",
    clock: Callable[[], float] = time.time,
    max_ttl: int | None = None,
) -> None:
    """Inject the store and secret (tests); by default both come from the environment
    (MICROFL_STORE, MICROFL_SECRET) on first use. None forgets them."""
    global _config
    _config = (
        None
        if store is None
        else _Config(store, secret, None, max_ttl or max_ttl_from_env(), clock)
    )


def _get_config() -> _Config:
    global _config
    with _lock:
        if _config is None:
            url = os.environ.get("MICROFL_STORE", "")
            if not url:
                raise BadRequest("the console has no MICROFL_STORE; set it as for the functions")
            _config = _Config(
                open_store(url),
                secret_from_env(),
                previous_secret_from_env(),
                max_ttl_from_env(),
                time.time,
            )
        return _config


# --- the session -------------------------------------------------------------------------------


def _key(secret: bytes) -> bytes:
    return hmac.new(secret, b"microfl console session v1", hashlib.sha256).digest()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def session_cookie(secret: bytes, scope: str, expires: int) -> str:
    """The cookie's value for a session over `scope` (a job, or "*") until `expires`."""
    payload = _b64(json.dumps({"exp": expires, "job": scope}, sort_keys=True).encode())
    return f"{payload}.{_b64(hmac.new(_key(secret), payload.encode(), 'sha256').digest())}"


def _session(cfg: _Config, value: str | None) -> str | None:
    """The scope of a valid, unexpired session cookie; None for anything else."""
    if not value or len(value) > 512 or not re.fullmatch(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+", value):
        return None
    payload, mac = value.split(".")
    want = _b64(hmac.new(_key(cfg.secret), payload.encode(), "sha256").digest())
    if not hmac.compare_digest(want.encode(), mac.encode()):
        return None
    try:
        doc = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        scope, expires = str(doc["job"]), int(doc["exp"])
    except (ValueError, KeyError, TypeError):
        return None
    return scope if cfg.clock() < expires else None


# --- answers -----------------------------------------------------------------------------------


def _answer(body: str | bytes, status: int = 200, content_type: str = "") -> flask.Response:
    response = flask.Response(body, status=status)
    response.headers["Content-Type"] = content_type or "text/html; charset=utf-8"
    return response


def _redirect(location: str) -> flask.Response:
    response = _answer("", 303)
    response.headers["Location"] = location
    return response


def _secure(request: flask.Request, response: flask.Response) -> flask.Response:
    response.headers.update(HEADERS)
    response.headers.setdefault("Cache-Control", "no-store")
    if _https(request):
        response.headers["Strict-Transport-Security"] = "max-age=31536000"
    return response


def _https(request: flask.Request) -> bool:
    """Served over https: directly, or behind Knative's ingress (X-Forwarded-Proto)."""
    forwarded = request.headers.get("X-Forwarded-Proto", "").split(",")[0].strip()
    return request.scheme == "https" or forwarded == "https"


def _signin_page(problem: str = "", status: int = 200) -> flask.Response:
    return _answer(pages.render("signin", problem=problem, signed_in=False, scope=""), status)


def _error_page(exc: BaseException, scope: str | None) -> flask.Response:
    status, body = http_error(exc)
    if status >= 500:
        LOG.error("console: %s: %s", type(exc).__name__, exc, exc_info=exc)
    page = pages.render(
        "error",
        status=status,
        message=body["message"],
        signed_in=scope is not None,
        scope=scope or "",
    )
    return _answer(page, status)


def not_found(request: flask.Request) -> flask.Response:
    """Paths the framework routes itself (/favicon.ico, /robots.txt)."""
    page = pages.render("error", status=404, message="no such page", signed_in=False, scope="")
    return _secure(request, _answer(page, 404))


def handle(request: flask.Request) -> flask.Response:
    logs.install()
    return _secure(request, _route(request))


def _route(request: flask.Request) -> flask.Response:
    path, method = request.path, request.method
    if path.startswith("/assets/"):
        asset = pages.ASSETS.get(path[len("/assets/") :])
        if asset is None or method not in ("GET", "HEAD"):
            return _answer("not found", 404, "text/plain; charset=utf-8")
        response = _answer(asset[0], 200, asset[1])
        response.headers["Cache-Control"] = "public, max-age=300"
        return response
    try:
        cfg = _get_config()
    except MicroFLError as exc:
        return _error_page(exc, None)
    if path in ("/signin", "/signout"):
        return _sign(request, cfg, path)
    scope = _session(cfg, request.cookies.get(COOKIE))
    if scope is None:
        response = _signin_page("Sign in with an admin token to see this page.", 401)
        if COOKIE in request.cookies:  # expired or forged: forget it
            response.delete_cookie(COOKIE, path="/", samesite="Strict", httponly=True)
        return response
    for pattern, name in ROUTES:
        match = re.fullmatch(pattern, path)
        if match is None:
            continue
        if method not in ("GET", "HEAD"):
            response = _answer("the console is read-only: GET only", 405, "text/plain")
            response.headers["Allow"] = "GET, HEAD"
            return response
        try:
            return _page(cfg, name, scope, match.groupdict())
        except Exception as exc:
            return _error_page(exc, scope)
    page = pages.render("error", status=404, message=f"no page {path}", signed_in=True, scope=scope)
    return _answer(page, 404)


def _page(cfg: _Config, name: str, scope: str, params: dict[str, str]) -> flask.Response:
    store, now = cfg.store, cfg.clock()
    base = {"signed_in": True, "scope": scope}
    if name in ("jobs", "jobs_fragment"):
        jobs = view.jobs_view(store, scope)
        return _answer(pages.render("jobs" if name == "jobs" else "jobs_table", jobs=jobs, **base))
    job = params["job"]
    if name == "model":
        version = int(params["version"])
        response = _answer(
            view.model_bytes(store, job, scope, version), 200, "application/octet-stream"
        )
        name_ = f"{job}-{version:08d}.safetensors"
        response.headers["Content-Disposition"] = f'attachment; filename="{name_}"'
        return response
    if name == "job_fragment":
        live = view.live_view(store, job, scope, now)
        return _answer(pages.render("live", live=live, **base))
    doc = view.job_view(store, job, scope, now)
    is_async = doc["spec"]["mode"] == "async"
    unit = "version" if is_async else "round"
    names = sorted({m for h in doc["history"] for m in h["metrics"]})[:12]
    charts = [
        pages.chart(
            m, [(h["round"], h["metrics"][m]) for h in doc["history"] if m in h["metrics"]], unit
        )
        for m in names
    ]
    spent = [(h["round"], h["epsilon"]) for h in doc["history"] if h["epsilon"] is not None]
    return _answer(
        pages.render(
            "job",
            **doc,
            **base,
            is_async=is_async,
            participation=pages.participation_chart(doc["history"], unit),
            charts=charts,
            privacy=pages.chart("epsilon spent so far", spent, unit) if spent else "",
            gantt=pages.timeline_chart(doc["timeline"], now),
        )
    )


def _sign(request: flask.Request, cfg: _Config, path: str) -> flask.Response:
    """GET /signin: the form; POST /signin: token in, session cookie out; POST /signout."""
    if request.method in ("GET", "HEAD") and path == "/signin":
        if _session(cfg, request.cookies.get(COOKIE)) is not None:
            return _redirect("/")
        return _signin_page()
    if request.method != "POST":
        response = _answer("sign in and out with POST", 405, "text/plain")
        response.headers["Allow"] = "GET, POST" if path == "/signin" else "POST"
        return response
    origin = request.headers.get("Origin")
    if origin and origin != "null" and urlsplit(origin).netloc != request.host:
        return _signin_page("Sign in from the console's own page.", 403)
    if path == "/signout":
        response = _redirect("/signin")
        response.delete_cookie(COOKIE, path="/", samesite="Strict", httponly=True)
        return response
    if (request.content_length or 0) > MAX_FORM_BYTES:
        return _signin_page("That is not a token: the form is too large.", 413)
    token = request.form.get("token", "").strip()
    try:
        claims = verify_admin(
            cfg.secret, token, cfg.clock(), previous=cfg.previous, max_ttl=cfg.max_ttl
        )
    except MicroFLError as exc:
        status, body = http_error(exc)  # 401 malformed or badly signed, 403 not an admin's
        return _signin_page(body["message"], status)
    now = int(cfg.clock())
    expires = min(claims.expires, now + SESSION_TTL)
    response = _redirect("/")
    response.set_cookie(
        COOKIE,
        session_cookie(cfg.secret, claims.job, expires),
        max_age=expires - now,
        path="/",
        secure=_https(request),
        httponly=True,
        samesite="Strict",
    )
    LOG.info("console sign-in", extra={"job": claims.job if claims.job != ANY_JOB else None})
    return response
