"""Request ids, errors → one JSON shape, one canonical log line per request, the body deadline.

A client that hangs up before its request is read is the client's failure:
it is logged and counted with status 499 (``ClientDisconnected``), never as a
500.  A body still incomplete ``listen.body_timeout_seconds`` after its head
gets the connection closed, counted as 408 (``RequestTimeout``).
"""

from __future__ import annotations

import asyncio
import functools
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from broker import audit, hot_log, names
from broker.errors import (
    BrokerError,
    MethodNotAllowed,
    NotFound,
    RequestInvalid,
    RequestTooLarge,
)
from broker.http.cors import CorsRejected, is_preflight
from broker.http.keys import SERVICES
from broker.logs import scrub_text
from broker.request_context import begin as begin_request

__all__ = [
    "CLIENT_CLOSED_REQUEST",
    "REQUEST_ID",
    "STS_COMPATIBLE_ROUTES",
    "UNMATCHED_PATH",
    "error_response",
    "finish_request",
    "finished_fields",
    "layered",
    "log_finished",
    "new_request_id",
    "reply_error",
    "request_context",
    "unmatched",
]

log = structlog.get_logger("broker.http")

REQUEST_ID = web.RequestKey("request_id", str)
_BODY_TIMED_OUT = web.RequestKey("body_timed_out", bool)
CLIENT_CLOSED_REQUEST = 499
"""The status counted and logged (never sent) when a client hangs up mid-request (nginx's 499)."""
STS_COMPATIBLE_ROUTES = frozenset({"credentials"})
"""Route names whose error bodies also carry the mobile SDKs' StatusCode/ErrorCode/ErrorMessage."""

_HTTP_ERRORS: dict[int, type[BrokerError]] = {
    404: NotFound,
    405: MethodNotAllowed,
    413: RequestTooLarge,
}


def new_request_id() -> str:
    """A fresh request id: 32 random hex characters.

    Unique, not secret (it is echoed in every reply): Python's own generator,
    reseeded in every forked worker, costs no system call per request.
    """
    return f"{random.getrandbits(128):032x}"


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


def _as_broker_error(request: web.Request, exc: web.HTTPException) -> BrokerError:
    cls = _HTTP_ERRORS.get(exc.status)
    if cls is MethodNotAllowed and is_preflight(request):
        return CorsRejected()  # no cors.allow_origins: no origin may call (cors.py)
    if cls is MethodNotAllowed:
        return MethodNotAllowed(allow=exc.headers.get("Allow", ""))
    if cls is not None:
        return cls()
    if 400 <= exc.status < 500:
        return RequestInvalid("the request could not be processed")
    return BrokerError()


def layered(layers: Sequence[Middleware]) -> Callable[[Handler], Handler]:
    """Wrap a handler in ``layers``, the first outermost, as aiohttp applies middlewares."""

    def wrap(handler: Handler) -> Handler:
        for layer in reversed(layers):
            handler = functools.partial(layer, handler=handler)
        return handler

    return wrap


UNMATCHED_PATH = "/{unmatched_path:.*}"
"""The catch-all route, added last: every request no other route takes."""


async def unmatched(request: web.Request) -> web.StreamResponse:
    """404, or 405 with ``Allow`` when another route has the path (as aiohttp's router says)."""
    allowed: set[str] = set()
    catch_all = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is not catch_all:
            allowed |= (await resource.resolve(request))[1]
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


@web.middleware
async def request_context(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Assign a request id, turn every error into JSON, log one line per request."""
    incoming = request.headers.get("X-Request-Id")
    if incoming is not None and names.REQUEST_ID.fullmatch(incoming):
        request_id, log_id = incoming, scrub_text(incoming)  # the client's: it might be anything
    else:
        request_id = log_id = new_request_id()  # lower-case hex: never a secret's shape
    request[REQUEST_ID] = request_id
    route = request.match_info.route.name
    begin_request(request_id, route, request.remote, log_id)
    started = time.perf_counter()
    deadline = _body_deadline(request) if request.body_exists else None
    try:
        outcome: web.StreamResponse | BrokerError = await handler(request)
    except BrokerError as err:
        outcome = err
    except web.HTTPException as exc:
        outcome = _as_broker_error(request, exc)
    except ConnectionError:
        if not _client_gone(request):
            log.exception("request_crashed")
            outcome = BrokerError()
        else:
            gone = _gone(request)
            finish_request(request, route, gone.status, gone.code, time.perf_counter() - started)
            return web.Response(status=gone.status)  # never delivered: the client has left
    except Exception:
        log.exception("request_crashed")
        outcome = BrokerError()
    finally:
        if deadline is not None:
            deadline.cancel()
    if isinstance(outcome, BrokerError):
        if outcome.status in audit.REFUSAL_STATUSES:
            request.app[SERVICES].audit.refused(outcome)
        response: web.StreamResponse = reply_error(request, outcome, request_id)
        finish_request(request, route, response.status, outcome.code, time.perf_counter() - started)
        return response
    outcome.headers["X-Request-Id"] = request_id
    finish_request(request, route, outcome.status, None, time.perf_counter() - started)
    return outcome


@dataclass(frozen=True, slots=True)
class _ClientGone:
    """The client closed the connection before its request was read: its failure, not ours."""

    status: int
    code: str


def _gone(request: web.Request) -> _ClientGone:
    """How a request whose client left is counted: 408 if its body timed out, else 499."""
    if request.get(_BODY_TIMED_OUT):
        return _ClientGone(408, "RequestTimeout")
    return _ClientGone(CLIENT_CLOSED_REQUEST, "ClientDisconnected")


def _client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _body_deadline(request: web.Request) -> asyncio.TimerHandle | None:
    """Close the connection if the body has not all arrived within ``body_timeout_seconds``."""
    if request.content.is_eof():  # the caller checked ``body_exists``
        return None
    if _client_gone(request):  # left before its handler ran: aiohttp never fails the body then
        request.content.set_exception(ConnectionResetError("the client has left"))
        return None
    seconds = request.app[SERVICES].settings.listen.body_timeout_seconds
    return asyncio.get_running_loop().call_later(seconds, _body_timed_out, request)


def _body_timed_out(request: web.Request) -> None:
    if request.content.is_eof():
        return  # all of it arrived: the handler is just slow
    request[_BODY_TIMED_OUT] = True
    request.app[SERVICES].metrics.connections_reaped.labels("body_timeout").inc()
    log.info("connection_reaped", reason="body_timeout")
    transport = request.transport
    if transport is not None:
        transport.close()
    request.content.set_exception(ConnectionResetError("the request body timed out"))


def finish_request(
    request: web.Request, route: str | None, status: int, error_code: str | None, elapsed: float
) -> None:
    """Count the request in the metrics and write its one ``request_finished`` line."""
    request.app[SERVICES].metrics.request_finished(route or "unmatched", status, elapsed)
    log_finished(request, status, error_code, elapsed)


def log_finished(request: web.Request, status: int, error_code: str | None, elapsed: float) -> None:
    """Write the request's ``request_finished`` line."""
    varying = {"duration_ms": round(elapsed * 1000, 3)}
    fields = finished_fields(request.method, request.path, status, error_code)
    hot_log.emit("request_finished", fields, varying)


def finished_fields(method: str, path: str, status: int, error_code: str | None) -> dict[str, Any]:
    """The repeating fields of a ``request_finished`` line (``path``: never the query)."""
    return {
        "method": method,
        "path": path,  # request.path: the query may carry access_token
        "status": status,
        "error_code": error_code,
    }


def reply_error(request: web.Request, err: BrokerError, request_id: str) -> web.Response:
    route = request.match_info.route
    sts_compatible = getattr(route, "name", None) in STS_COMPATIBLE_ROUTES
    if err.status >= 500:
        log.warning("request_failed", error_code=err.code, **_safe_context(err))
    return error_response(err, request_id, sts_compatible=sts_compatible)


def _safe_context(err: BrokerError) -> dict[str, Any]:
    return {f"ctx_{key}": value for key, value in err.context.items()}
