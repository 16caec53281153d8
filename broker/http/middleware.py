"""Request ids, errors → one JSON shape, and one canonical log line per request."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from broker import audit, names
from broker.errors import (
    BrokerError,
    MethodNotAllowed,
    NotFound,
    RequestInvalid,
    RequestTooLarge,
)
from broker.http.keys import SERVICES

__all__ = [
    "REQUEST_ID",
    "STS_COMPATIBLE_ROUTES",
    "error_response",
    "new_request_id",
    "request_context",
]

log = structlog.get_logger("broker.http")

REQUEST_ID = web.RequestKey("request_id", str)
STS_COMPATIBLE_ROUTES = frozenset({"credentials"})
"""Route names whose error bodies also carry the mobile SDKs' StatusCode/ErrorCode/ErrorMessage."""

_HTTP_ERRORS: dict[int, type[BrokerError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
}


def new_request_id() -> str:
    """A fresh request id: 32 random hex characters."""
    return os.urandom(16).hex()


def error_response(err: BrokerError, request_id: str, *, sts_compatible: bool) -> web.Response:
    """The one wire format for errors: ``{"error": {"code", "message", "request_id"}}``."""
    body: dict[str, Any] = {
        "error": {"code": err.code, "message": err.message, "request_id": request_id}
    }
    if sts_compatible:
        # The OSS mobile SDKs' auth-server format and the credentials-URI provider.
        body.update(StatusCode=err.status, ErrorCode=err.code, ErrorMessage=err.message)
        body["Code"] = err.code
    headers = {"Cache-Control": "no-store", "X-Request-Id": request_id}
    retry_after = err.retry_after_seconds
    if retry_after is not None:
        headers["Retry-After"] = str(retry_after)
    if isinstance(err, MethodNotAllowed) and err.context.get("allow"):
        headers["Allow"] = err.context["allow"]
    return web.Response(
        status=err.status,
        text=json.dumps(body, separators=(",", ":")),
        content_type="application/json",
        headers=headers,
    )


def _as_broker_error(exc: web.HTTPException) -> BrokerError:
    cls = _HTTP_ERRORS.get(exc.status)
    if cls is MethodNotAllowed:
        return MethodNotAllowed(allow=exc.headers.get("Allow", ""))
    if cls is not None:
        return cls()
    if 400 <= exc.status < 500:
        return RequestInvalid("the request could not be processed")
    return BrokerError()


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign a request id, turn every error into JSON, log one line per request."""
    incoming = request.headers.get("X-Request-Id", "")
    request_id = incoming if names.REQUEST_ID.fullmatch(incoming) else new_request_id()
    request[REQUEST_ID] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    audit.begin_request(request_id, request.match_info.route.name, request.remote)
    started = time.perf_counter()
    error: BrokerError | None = None
    try:
        response = await handler(request)
    except BrokerError as err:
        error = err
    except web.HTTPException as exc:
        error = _as_broker_error(exc)
    except Exception:
        log.exception("request_crashed")
        error = BrokerError()
    if error is not None:
        if error.status in audit.REFUSAL_STATUSES:
            request.app[SERVICES].audit.refused(error)
        response = _reply_error(request, error, request_id)
    else:
        response.headers["X-Request-Id"] = request_id
    _finish(request, response, error, time.perf_counter() - started)
    return response


def _finish(
    request: web.Request, response: web.StreamResponse, error: BrokerError | None, elapsed: float
) -> None:
    """Count the request in the metrics and write its one ``request_finished`` line."""
    route = request.match_info.route.name or "unmatched"
    metrics = request.app[SERVICES].metrics
    metrics.requests.labels(route, str(response.status)).inc()
    metrics.request_seconds.labels(route).observe(elapsed)
    log.info(
        "request_finished",
        method=request.method,
        path=request.path,  # never the query: it may carry access_token
        status=response.status,
        duration_ms=round(elapsed * 1000, 3),
        error_code=error.code if error is not None else None,
    )


def _reply_error(request: web.Request, err: BrokerError, request_id: str) -> web.Response:
    route = request.match_info.route
    sts_compatible = getattr(route, "name", None) in STS_COMPATIBLE_ROUTES
    if err.status >= 500:
        log.warning("request_failed", error_code=err.code, **_safe_context(err))
    return error_response(err, request_id, sts_compatible=sts_compatible)


def _safe_context(err: BrokerError) -> dict[str, Any]:
    return {f"ctx_{key}": value for key, value in err.context.items()}
