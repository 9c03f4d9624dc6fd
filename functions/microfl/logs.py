"""The functions' diagnostics as JSON lines on stderr, the structured format Cloud Logging and
Knative log collectors parse: `severity` (Cloud Logging's level names), `message`, `logger`,
`time`, and when known `job`, `round`, `event` (the CloudEvent id) and `type`, passed as
`extra=`. An error's traceback goes to `stack_trace`, where Error Reporting looks for it.

Modules log through `logging.getLogger(__name__)`; `install()` puts the formatter on the
"microfl" logger tree when a function handles its first request (never at import, so tools and
tests that import microfl keep their own logging). Nothing here may carry a token or update
bytes: callers log ids and messages, and the formatter masks anything shaped like a token."""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from datetime import UTC, datetime
from typing import Any

__all__ = ["JsonFormatter", "install"]

FIELDS = ("job", "round", "event", "type", "client", "status", "error")
# Bearer values, mfl1 tokens and JWTs (Pub/Sub's OIDC tokens) wherever a message quotes them.
_TOKEN = re.compile(r"(?i:bearer\s+)\S+|mfl1\.[\w-]+\.[\w-]+|eyJ[\w-]*\.[\w-]+\.[\w-]*")
_installed = False
_lock = threading.Lock()


def redact(text: str) -> str:
    return _TOKEN.sub("[token]", text)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "severity": record.levelname,  # DEBUG/INFO/WARNING/ERROR/CRITICAL, as Cloud Logging
            "message": redact(record.getMessage()),
            "logger": record.name,
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
        }
        for name in FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = redact(value) if isinstance(value, str) else value
        if record.exc_info:
            entry["stack_trace"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry, default=str)


class _Stderr(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (test runners swap it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


def install() -> None:
    """JSON lines on stderr for the "microfl" loggers, INFO and up; once per process."""
    global _installed
    if _installed:
        return
    with _lock:
        if not _installed:
            handler = _Stderr()
            handler.setFormatter(JsonFormatter())
            root = logging.getLogger("microfl")
            root.addHandler(handler)
            root.setLevel(logging.INFO)
            root.propagate = False
            _installed = True
