"""Connections: TLS, parser limits, timeouts that reap slow clients, and a quiet protocol handler.

Three timeouts bound what one client can hold (all under ``listen``):

* ``header_timeout_seconds``: a request head (request line and headers) must
  arrive whole within this long of its first byte, or of the connection
  opening; otherwise the connection is closed (slowloris).
* ``body_timeout_seconds``: a request body must arrive whole within this long
  of its head (enforced by ``broker.http.middleware``); otherwise the
  connection is closed and the request counted as a 408.
* ``keepalive_timeout_seconds``: an idle keep-alive connection is closed after
  this long (aiohttp's own default is 3,630 s).

aiohttp's protocol handler logs a request it cannot parse with a traceback
that quotes the raw bytes (an ``Authorization`` header among them) and echoes
them in a plain-text 400.  ``BrokerRunner``'s handler does neither: it logs
the refusal's status and exception class only, and answers the one JSON error.
"""

from __future__ import annotations

import asyncio
import ssl
from dataclasses import dataclass
from typing import Any, cast

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from broker.config import TlsSettings
from broker.errors import BrokerError, RequestInvalid
from broker.http.keys import SERVICES
from broker.http.middleware import error_response, new_request_id
from broker.metrics import Metrics
from broker.services import Services

__all__ = ["BrokerRunner", "runner_options", "ssl_context"]

log = structlog.get_logger("broker.http")

_PARSE_ERROR = "the request line or headers are malformed or too large"
_UNPARSED_ROUTE = "unparsed"  # the route label of requests the parser refused
_UNHANDLED_ROUTE = "unhandled"  # ... and of errors that escaped the middleware
_MAX_LINGER_SECONDS = 10.0


def runner_options(services: Services) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner``: parser limits, keep-alive, and no access log.

    aiohttp's access log would print query strings, which may carry
    ``access_token``; the middleware writes one redacted line per request
    instead.  An unread body is drained for at most ``body_timeout_seconds``
    (and never over 10 s) after the reply, so a slow body holds nothing longer.
    """
    listen = services.settings.listen
    return {
        "access_log": None,
        "max_line_size": listen.max_header_bytes,
        "max_field_size": listen.max_header_bytes,
        "max_headers": 64,
        "keepalive_timeout": listen.keepalive_timeout_seconds,
        "lingering_time": min(listen.body_timeout_seconds, _MAX_LINGER_SECONDS),
    }


def ssl_context(tls: TlsSettings) -> ssl.SSLContext:
    """The listener's TLS context: TLS 1.2+, and client certificates when a client CA is set."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(tls.cert_file, tls.key_file)
    if tls.client_ca_file is not None:
        context.load_verify_locations(cafile=tls.client_ca_file)
        context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_OPTIONAL
    return context


@dataclass(frozen=True, slots=True)
class _ConnectionPolicy:
    """What every connection's handler needs: the head timeout, and where to count."""

    header_timeout_seconds: float
    metrics: Metrics

    def reaped(self, reason: str) -> None:
        """A connection closed because its client was too slow."""
        self.metrics.connections_reaped.labels(reason).inc()
        log.info("connection_reaped", reason=reason)

    def refused(self, status: int, exc: BaseException | None, request_id: str) -> None:
        """A request head aiohttp could not parse: counted, logged without its bytes."""
        self.metrics.requests.count(_UNPARSED_ROUTE, status)
        reason = type(exc).__name__ if exc is not None else None
        log.info("request_refused", status=status, reason=reason, request_id=request_id)

    def crashed(self, status: int, exc: BaseException | None, request_id: str) -> None:
        """An error outside the middleware (a bug): counted and logged with its traceback."""
        self.metrics.requests.count(_UNHANDLED_ROUTE, status)
        log.error("request_crashed", status=status, request_id=request_id, **_exception_fields(exc))


class _BrokerRequestHandler(RequestHandler):
    """aiohttp's protocol handler with a head timeout, and no raw request bytes in logs or replies.

    The head timer starts when a connection opens and when the first byte of
    a new request arrives on an idle connection; a complete head stops it.
    It reads aiohttp's own state (``_waiter``, ``_messages``,
    ``_request_count``, as aiohttp's keep-alive check does); tests in
    tests/http/test_connections.py pin the behaviour.
    """

    __slots__ = ("_head_started", "_head_timer", "_policy")

    def __init__(self, manager: web.Server, *, policy: _ConnectionPolicy, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._policy = policy
        self._head_started: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._head_begins()

    def data_received(self, data: bytes) -> None:
        if data and self._head_started is None and self._awaiting_request():
            self._head_begins()
        parsed = self._request_count
        super().data_received(data)
        if self._request_count != parsed:
            self._head_started = None  # complete: the armed timer will find nothing to do

    def connection_lost(self, exc: BaseException | None) -> None:
        self._head_started = None
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def _awaiting_request(self) -> bool:
        """Idle between requests, or reading a request head (no request is being handled)."""
        waiter = self._waiter
        return waiter is not None and not waiter.done() and not self._messages

    def _head_begins(self) -> None:
        """A head starts arriving: note when, and arm the timer unless one is armed already.

        One timer per connection at a time, re-armed only when it fires: a
        keep-alive connection's requests cost no timer each.
        """
        self._head_started = self._loop.time()
        if self._head_timer is None:
            delay = self._policy.header_timeout_seconds
            self._head_timer = self._loop.call_later(delay, self._head_check)

    def _head_check(self) -> None:
        """The timer fired: reap a head that took too long, or wait out the current one."""
        self._head_timer = None
        started = self._head_started
        if started is None or self.transport is None:
            return
        remaining = started + self._policy.header_timeout_seconds - self._loop.time()
        if remaining > 0:
            self._head_timer = self._loop.call_later(remaining, self._head_check)
        elif self._awaiting_request():
            self._policy.reaped("header_timeout")
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """One JSON error for a request aiohttp could not parse or handle; nothing of it logged."""
        request_id = new_request_id()
        if status >= 500:
            self._policy.crashed(status, exc, request_id)
        else:
            self._policy.refused(status, exc, request_id)
        if request.writer.output_size > 0:  # as aiohttp: a reply has begun, the connection is lost
            raise ConnectionError("the response has already started")
        err = BrokerError() if status >= 500 else RequestInvalid(_PARSE_ERROR)
        reply = error_response(err, request_id, sts_compatible=False)
        reply.set_status(status)  # the status aiohttp chose, with the one error body
        reply.force_close()
        return reply

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's "Unhandled exception" log, minus the message (it may quote the request)."""
        exc = kw.get("exc_info")
        log.error(
            "connection_failed",
            **_exception_fields(exc if isinstance(exc, BaseException) else None),
        )


def _exception_fields(exc: BaseException | None) -> dict[str, Any]:
    """Log fields for ``exc``: its class, and its traceback unless it came from parsing bytes."""
    if exc is None:
        return {}
    if isinstance(exc, HttpProcessingError):
        return {"error_type": type(exc).__name__}
    return {"error_type": type(exc).__name__, "exc_info": exc}


class _BrokerServer(web.Server):
    policy: _ConnectionPolicy

    def __call__(self) -> RequestHandler:
        return _BrokerRequestHandler(self, policy=self.policy, loop=self._loop, **self._kwargs)


class BrokerRunner(web.AppRunner):
    """``web.AppRunner`` whose connections time out slow clients and never echo a request head.

    Handlers are never cancelled when their client leaves (aiohttp's default;
    its test server turns cancellation on, so this pins it): the handler sees
    a failed body read and the middleware counts a 499.
    """

    def __init__(self, app: web.Application, **kwargs: Any) -> None:
        super().__init__(app, **{**kwargs, "handler_cancellation": False})

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        services = self.app[SERVICES]
        server.__class__ = _BrokerServer
        cast(_BrokerServer, server).policy = _ConnectionPolicy(
            header_timeout_seconds=services.settings.listen.header_timeout_seconds,
            metrics=services.metrics,
        )
        return server
