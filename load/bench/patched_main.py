"""functions/main.py with the changes of patched.py installed: the function source of the
benchmarks' *patched* runs (localplat.patches), never of the platform."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import flask  # noqa: E402
import functions_framework  # noqa: E402
import patched  # noqa: E402

from microfl import handlers  # noqa: E402

patched.install()


@functions_framework.http
def ingest(request: flask.Request):  # type: ignore[no-untyped-def]
    return handlers.ingest(request)


@functions_framework.http
def aggregate(request: flask.Request):  # type: ignore[no-untyped-def]
    return handlers.aggregate(request)


@functions_framework.http
def finalize(request: flask.Request):  # type: ignore[no-untyped-def]
    return handlers.finalize(request)
