"""HTTP edges of the three functions: decode the request, call the service, encode the answer.

Each error is answered through errors.http_error's table; transient faults become 503 so the
event delivery retries them, poison events 400 so it dead-letters them."""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Callable
from typing import Any

import flask

from microfl import aggregate as aggregate_service
from microfl import finalize as finalize_service
from microfl import ingest as ingest_service
from microfl import logs, prometheus
from microfl.backends import EVENT_TARGETS, Backends, backends_from_env, check_env
from microfl.errors import BadRequest, ConfigError, EventTooLarge, Unauthorized, http_error
from microfl.serde import Event, event_from_http
from microfl.tokens import bearer, valid_id

__all__ = [
    "aggregate",
    "check_config",
    "finalize",
    "ingest",
    "not_found",
    "set_backends",
    "warm",
]

LOG = logging.getLogger(__name__)
MAX_EVENT_BYTES = 64 * 1024  # events are a few hundred bytes; nothing reads more than this
_backends: Backends | None = None
_lock = threading.Lock()


def check_config(target: str) -> None:
    """Exit the process with the reason in its log if `target` must not run with this
    environment (backends.check_env), so that the revision never becomes ready. main.py calls
    it at import, before the server starts. Without MICROFL_STORE the functions are embedded
    (tests inject their backends with set_backends) and nothing is checked here."""
    if _backends is not None or not os.environ.get("MICROFL_STORE"):
        return
    try:
        check_env(target)
    except ConfigError as exc:
        logs.install()
        LOG.critical("microfl %s refuses to start: configuration error: %s", target, exc)
        raise SystemExit(2) from None


def warm(target: str) -> None:
    """Prepare an instance of `target` before its server starts (main.py): load the aggregate's
    fold loops here, and have the serving process (gunicorn forks it after this import) build
    its backends and event bus client in the background at once, not at the first event.
    Embedded (no MICROFL_STORE: tests inject their backends) there is no instance to prepare."""
    if not os.environ.get("MICROFL_STORE") or target not in ("ingest", *EVENT_TARGETS):
        return
    if target == "aggregate":
        aggregate_service.warm()
    os.register_at_fork(after_in_child=_connect_soon)


def _connect_soon() -> None:
    threading.Thread(target=_connect, daemon=True, name="microfl-connect").start()


def _connect() -> None:
    try:
        _get_backends().bus.connect()
    except Exception as exc:  # the first request builds them again and answers the error
        LOG.warning("event bus not connected ahead of the first request: %s", exc)


def set_backends(b: Backends | None) -> None:
    """Inject backends (tests); by default they are built from the environment on first use."""
    global _backends
    _backends = b


def _get_backends() -> Backends:
    global _backends
    with _lock:
        if _backends is None:
            _backends = backends_from_env()
        return _backends


Response = tuple[Any, int, dict[str, str]]


def _json(status: int, body: dict[str, Any]) -> Response:
    return flask.jsonify(body), status, {}


def _error(exc: BaseException, context: dict[str, Any], event: bool = False) -> Response:
    """The answer for exc; its full text goes to the log only: every 5xx as ERROR with its
    traceback, and refused events (poison, bad push token) as WARNING. Client 4xx on ingest are
    not logged: their body says it all, and a hostile client must not fill the log."""
    status, body = http_error(exc)
    extra = {**context, "status": status, "error": body["error"]}
    if status >= 500:
        LOG.error("%s: %s", type(exc).__name__, exc, exc_info=exc, extra=extra)
    elif event:
        cause = f" ({exc.__cause__})" if isinstance(exc, Unauthorized) and exc.__cause__ else ""
        LOG.warning("event refused: %s%s", exc, cause, extra=extra)
    return _json(status, body)


def _event_context(event: Event) -> dict[str, Any]:
    data = event.data if isinstance(event.data, dict) else {}
    job, r = data.get("job"), data.get("round")
    return {"event": event.id, "type": event.type, "job": job, "round": r}


ROUTES: list[tuple[str, str, str]] = [
    ("GET", r"/healthz", "healthz"),
    ("GET", r"/metrics", "metrics"),
    ("GET", r"/v1/jobs/(?P<job>[^/]+)", "job"),
    ("GET", r"/v1/jobs/(?P<job>[^/]+)/model", "model"),
    ("POST", r"/v1/jobs/(?P<job>[^/]+)/rounds/(?P<round>[0-9]{1,9})/updates", "update"),
    ("GET", r"/v1/jobs/(?P<job>[^/]+)/rounds/(?P<round>[0-9]{1,9})", "round"),
    ("POST", r"/v1/jobs/(?P<job>[^/]+)/updates", "async_update"),
    ("GET", r"/v1/jobs/(?P<job>[^/]+)/versions/(?P<version>[0-9]{1,9})", "version"),
]


def ingest(request: flask.Request) -> Response:
    logs.install()
    for method, pattern, name in ROUTES:
        match = re.fullmatch(pattern, request.path)
        if match:
            if request.method != method:
                return _json(
                    405,
                    {
                        "error": "method_not_allowed",
                        "message": f"{request.path} answers {method} only",
                    },
                )
            try:
                answer = _ingest_route(name, request, match.groupdict())
            except Exception as exc:
                job, r = match.groupdict().get("job"), match.groupdict().get("round")
                answer = _error(exc, {"job": job, "round": None if r is None else int(r)})
            if name in ("update", "async_update"):
                prometheus.upload(answer[1])
            return answer
    return not_found(request)


def not_found(request: flask.Request) -> Response:
    return _json(
        404, {"error": "not_found", "message": f"no endpoint {request.path}; see the OpenAPI file"}
    )


def _ingest_route(name: str, request: flask.Request, params: dict[str, str]) -> Response:
    if name == "healthz":
        return _json(200, {"status": "ok"})
    if name == "metrics":
        return prometheus.exposition()
    job = params["job"]
    if not valid_id(job):
        raise BadRequest(f"job id {job!r} is not valid: 1-64 letters, digits, '.', '_', '-'")
    b = _get_backends()
    token = bearer(request.headers.get("Authorization"))
    if name == "job":
        return _json(200, ingest_service.get_job(b, job, token))
    if name == "model":
        version = request.args.get("version")
        if version is not None and not re.fullmatch(r"[0-9]{1,9}", version):
            raise BadRequest(f"version must be a non-negative integer, not {version!r}")
        data, v = ingest_service.get_model(b, job, token, None if version is None else int(version))
        return (
            data,
            200,
            {"Content-Type": "application/octet-stream", "MicroFL-Model-Version": str(v)},
        )
    if name == "version":
        return _json(200, ingest_service.get_version(b, job, int(params["version"]), token))
    if name == "async_update":
        status, body = ingest_service.post_async_update(
            b, job, token, request.stream.read, request.content_length
        )
        return _json(status, body)
    r = int(params["round"])
    if name == "round":
        return _json(200, ingest_service.get_round(b, job, r, token))
    status, body = ingest_service.post_update(
        b, job, r, token, request.stream.read, request.content_length
    )
    return _json(status, body)


def _event_function(handle: Callable[[Backends, Any], None]) -> Callable[[flask.Request], Response]:
    def endpoint(request: flask.Request) -> Response:
        logs.install()
        if request.method == "GET" and request.path == "/metrics":
            return prometheus.exposition()
        if request.method != "POST":
            return _json(
                405,
                {"error": "method_not_allowed", "message": "CloudEvent functions answer POST only"},
            )
        context: dict[str, Any] = {}
        try:
            if (request.content_length or 0) > MAX_EVENT_BYTES:
                raise _too_large(request.content_length)
            b = _get_backends()
            if b.push_auth is not None:
                b.push_auth.verify(request.headers.get("Authorization"))
            body = request.stream.read(MAX_EVENT_BYTES + 1)  # chunked bodies: bounded too
            if len(body) > MAX_EVENT_BYTES:
                raise _too_large(None)
            event = event_from_http(dict(request.headers), body)
            context = _event_context(event)
            handle(b, event)
        except Exception as exc:
            answer = _error(exc, context, event=True)
            prometheus.event_refused(context.get("type"), answer[1])
            return answer
        LOG.info("handled %s", event.type, extra=context)
        return _json(200, {"status": "done", "id": event.id})

    return endpoint


def _too_large(length: int | None) -> EventTooLarge:
    size = f"{length} bytes" if length is not None else "larger"
    return EventTooLarge(
        f"event body is {size}; events are at most {MAX_EVENT_BYTES} bytes (a CloudEvent of "
        "the platform, in binary or structured mode)"
    )


aggregate = _event_function(aggregate_service.handle)
finalize = _event_function(finalize_service.handle)
