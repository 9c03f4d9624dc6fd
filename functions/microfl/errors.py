"""Micro-FL's exceptions, and the one table that maps them to HTTP answers.

    MicroFLError
    ├── RequestError                      a client's request is wrong (4xx)
    │   ├── BadRequest (ValueError)             400 malformed path or query
    │   ├── InvalidUpdate (ValueError)          400 not safetensors, bad num_examples
    │   ├── Unauthorized                        401 no token or a bad token
    │   ├── Forbidden                           403 token for another job, or expired
    │   ├── JobNotFound (LookupError)           404 unknown job
    │   ├── RoundNotFound (LookupError)         404 a round that has not opened
    │   ├── RoundNotOpen                        409 round r is not the open round
    │   ├── ConflictingUpdate                   409 same client, different bytes
    │   ├── StaleUpdate                         409 async: base version too old or unknown
    │   ├── WrongMode                           409 a sync endpoint of an async job, or back
    │   ├── UpdateTooLarge                      413 larger than the job's limit
    │   └── SchemaMismatch (ValueError)         422 names, shapes, dtypes; NaN/Inf
    ├── PoisonEvent (ValueError)           400 an event no retry can fix (dead-lettered)
    │   └── EventTooLarge                       413 an event body above the limit
    ├── ConfigError (ValueError)           bad job or platform configuration (operator)
    └── Unavailable                        503 transient: retry later
        ├── StorageUnavailable
        └── BusUnavailable

Third-party errors are translated where they are raised (`raise StorageUnavailable(...) from
exc`); `http_error` turns any exception into (status, JSON body) for the functions' answers:
a body says what the client can fix, never where the platform keeps things (the handlers log that).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "BadRequest",
    "BusUnavailable",
    "ConfigError",
    "ConflictingUpdate",
    "EventTooLarge",
    "Forbidden",
    "InvalidUpdate",
    "JobNotFound",
    "MicroFLError",
    "PoisonEvent",
    "RequestError",
    "RoundNotFound",
    "RoundNotOpen",
    "SchemaMismatch",
    "StaleUpdate",
    "StorageUnavailable",
    "Unauthorized",
    "Unavailable",
    "UpdateTooLarge",
    "WrongMode",
    "http_error",
]


class MicroFLError(Exception):
    """Root of every error Micro-FL raises on purpose."""


class RequestError(MicroFLError):
    """The client's request cannot be served as sent; the message says what to fix."""


class BadRequest(RequestError, ValueError):
    pass


class InvalidUpdate(RequestError, ValueError):
    pass


class Unauthorized(RequestError):
    pass


class Forbidden(RequestError):
    pass


class JobNotFound(RequestError, LookupError):
    pass


class RoundNotFound(RequestError, LookupError):
    pass


class RoundNotOpen(RequestError):
    pass


class ConflictingUpdate(RequestError):
    pass


class StaleUpdate(RequestError):
    """An async update whose base_version is newer than the latest, or staler than allowed."""


class WrongMode(RequestError):
    """A round endpoint of an async job, or the async endpoint of a sync job."""


class UpdateTooLarge(RequestError):
    pass


class SchemaMismatch(RequestError, ValueError):
    pass


class PoisonEvent(MicroFLError, ValueError):
    """An event that no retry can make valid: answered 400 so delivery dead-letters it."""


class ConfigError(MicroFLError, ValueError):
    pass


class Unavailable(MicroFLError):
    """A dependency is down or slow; the same request later will succeed."""


class StorageUnavailable(Unavailable):
    pass


class BusUnavailable(Unavailable):
    pass


class EventTooLarge(PoisonEvent):
    """An event body far larger than any event the platform sends (413, dead-lettered)."""


_RETRY = "retry in a moment (sending the same request again is safe)"

# error class -> (HTTP status, public error code[, public message]). First match in MRO order
# wins. Without a public message the exception's own text is the answer (4xx: it says what the
# client can fix); with one, the exception's text (paths, buckets, hosts, library errors) goes
# to the log only. A 5xx never answers with its exception's text.
ERROR_TABLE: dict[type[BaseException], tuple[int, str] | tuple[int, str, str]] = {
    BadRequest: (400, "bad_request"),
    InvalidUpdate: (400, "invalid_update"),
    Unauthorized: (401, "unauthorized"),
    Forbidden: (403, "forbidden"),
    JobNotFound: (404, "unknown_job"),
    RoundNotFound: (404, "unknown_round"),
    RoundNotOpen: (409, "round_not_open"),
    ConflictingUpdate: (409, "conflicting_update"),
    StaleUpdate: (409, "stale"),
    WrongMode: (409, "wrong_mode"),
    UpdateTooLarge: (413, "update_too_large"),
    SchemaMismatch: (422, "schema_mismatch"),
    PoisonEvent: (400, "invalid_event"),
    EventTooLarge: (413, "event_too_large"),
    ConfigError: (
        500,
        "configuration_error",
        "the platform is misconfigured; tell its operator (the details are in the function's log)",
    ),
    StorageUnavailable: (503, "unavailable", f"storage is unavailable; {_RETRY}"),
    BusUnavailable: (503, "unavailable", f"the event bus is unavailable; {_RETRY}"),
    Unavailable: (503, "unavailable", f"the service is busy or a dependency is down; {_RETRY}"),
}
INTERNAL = "internal error; the request can be retried"


def http_error(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(status, body) for an exception; unknown ones are 500 with no internals leaked."""
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            status, code, *public = ERROR_TABLE[cls]
            message = public[0] if public else INTERNAL if status >= 500 else str(exc)
            return status, {"error": code, "message": message}
    return 500, {"error": "internal", "message": INTERNAL}
