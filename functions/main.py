"""Function entry points for functions-framework: one Knative Service per target
(FUNCTION_TARGET=ingest|aggregate|finalize|console), all in one image. Thin on purpose: the work
is in microfl.handlers (microfl.console for the operator console) and the service modules."""

import os

import flask
import functions_framework

from microfl import console as console_edge
from microfl import handlers

# An unsafe configuration (weak secret, unchecked Pub/Sub pushes, ...) exits here, before the
# server starts: the revision never becomes ready and the reason is in the log.
handlers.check_config(os.environ.get("FUNCTION_TARGET", ""))
# The aggregate's fold loops are loaded here, so a warm instance's first fold does not wait.
handlers.warm(os.environ.get("FUNCTION_TARGET", ""))


def _streamed(answer: object) -> flask.Response:
    """The answer as a streamed response: functions-framework then does not read (and buffer)
    whatever is left of a request body that was refused early, say an oversized upload."""
    response = flask.make_response(answer)
    return flask.Response(
        iter([response.get_data()]), status=response.status_code, headers=response.headers
    )


@functions_framework.http
def ingest(request: flask.Request) -> flask.Response:
    return _streamed(handlers.ingest(request))


@functions_framework.http
def aggregate(request: flask.Request) -> flask.Response:
    return _streamed(handlers.aggregate(request))


@functions_framework.http
def finalize(request: flask.Request) -> flask.Response:
    return _streamed(handlers.finalize(request))


@functions_framework.http
def console(request: flask.Request) -> flask.Response:
    """The read-only operator console for admins (pages, not JSON; see microfl.console)."""
    return console_edge.handle(request)


@functions_framework.errorhandler(404)
def not_routed(error: Exception) -> flask.Response:
    """Paths the framework routes itself (/robots.txt, /favicon.ico, odd characters): JSON, or
    the console's page with its security headers."""
    if os.environ.get("FUNCTION_TARGET") == "console":
        return console_edge.not_found(flask.request)
    return _streamed(handlers.not_found(flask.request))
