"""Function entry points for functions-framework: one Knative Service per target
(FUNCTION_TARGET=ingest|aggregate|finalize), all in one image. Thin on purpose: the work is in
microfl.handlers and the service modules."""

import flask
import functions_framework

from microfl import handlers


@functions_framework.http
def ingest(request: flask.Request):  # type: ignore[no-untyped-def]
    return handlers.ingest(request)


@functions_framework.http
def aggregate(request: flask.Request):  # type: ignore[no-untyped-def]
    return handlers.aggregate(request)


@functions_framework.http
def finalize(request: flask.Request):  # type: ignore[no-untyped-def]
    return handlers.finalize(request)
