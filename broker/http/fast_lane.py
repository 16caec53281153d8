"""Cached credentials for a known API-key caller: the whole request in one step.

Most requests a busy broker serves are the same service asking again for the
credentials it had a second ago.  The general path (``middleware.
request_context`` → ``routes.get_credentials``) answers them through its
layers; the lane answers them directly, with what that path would produce:

* the same reply (bytes, status, headers, ``X-Request-Id``);
* the same audit record (``credentials_issued``, ``cache: hit``);
* the same two log lines (``credentials_issued``, ``request_finished``),
  their repeating part rendered once per token (``hot_log.line_start``);
* the same metrics (request count and latency, cache hit, request quota).

It takes a request only if, checked before it does anything, all hold: a
plain ``GET`` (no query, no body, no ``X-Request-Id``, no ``Origin`` when CORS
is configured) with one ``Authorization`` header that the admissions memo
knows from this address (``broker.http.admissions``, which a reload or a
revocation retires); the key may use this route; the caller's request for
this policy resolved before (``credential_requests.kept_target``); audit
records need not be waited for (``best_effort``); the token is fresh (not due
for refresh, ``min_ttl`` met); the caller's request quota has a token.  Every
other request goes the general way, untouched: refusals, refreshes, STS,
JWT and mTLS callers, narrowing, errors.

``FastLane.enabled`` False sends every request the general way (tests and
benchmarks compare the two).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from broker import hot_log, request_context
from broker.audit_render import RecordParts
from broker.credential_requests import Target, kept_target
from broker.errors import BrokerError
from broker.http.keys import ADMISSIONS, REPLIES, SERVICES
from broker.http.middleware import (
    REQUEST_ID,
    finish_request,
    finished_fields,
    log_finished,
    new_request_id,
    reply_error,
)
from broker.http.replies import json_response
from broker.http.routes import may_use_route
from broker.logs import HotRoute
from broker.models import Credentials, Principal
from broker.services import Services
from broker.vending import issued_fields

__all__ = ["ROUTE", "FastLane"]

log = structlog.get_logger("broker.http")

ROUTE = "credentials"
"""The route the lane serves (its name in ``http/app.py``)."""
_MAX_KEPT = 4096


@dataclass(slots=True)
class _Kept:
    """A target's audit record and log lines as rendered for one token, address and path."""

    target: Target
    token: Credentials
    address: str | None
    path: str
    record: RecordParts | None
    lines: _Lines | None


@dataclass(frozen=True, slots=True)
class _Lines:
    """The starts of ``credentials_issued`` and ``request_finished`` for one log route."""

    route: HotRoute
    bound: dict[str, Any]
    issued: str
    finished: str


class FastLane:
    """The credentials route's handler: the lane, or ``general`` for what it does not take."""

    __slots__ = ("_cors", "_general", "_kept_by_target", "enabled", "served")

    def __init__(self, general: Handler, *, cors: bool) -> None:
        self._general = general
        self._cors = cors
        self._kept_by_target: dict[int, _Kept] = {}
        self.enabled = True
        self.served = 0
        """Requests the lane answered itself."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Answer ``request`` in the lane if it qualifies, else the general way."""
        started = time.perf_counter()
        taken = self._taken(request) if self.enabled else None
        if taken is None:
            return await self._general(request)
        return self._serve(request, started, *taken)

    def _taken(
        self, request: web.Request
    ) -> tuple[Services, Principal, Target, Credentials, float] | None:
        """The request's caller, target and token if the lane takes it (its quota counted)."""
        headers = request.headers
        if (
            request.method != "GET"
            or request.query_string
            or "X-Request-Id" in headers
            or (self._cors and "Origin" in headers)
            or request.body_exists
        ):
            return None
        authorization = headers.getall("Authorization", ())
        if len(authorization) != 1:
            return None
        services = request.app[SERVICES]
        principal, quota = request.app[ADMISSIONS].admitted(request, services, authorization[0])
        if principal is None or not may_use_route(principal, ROUTE) or services.audit.waits:
            return None
        target = kept_target(services, principal, request.match_info["policy"])
        if target is None:
            return None
        now = services.clock()
        token = services.cache.servable(target.key, target.min_ttl, now)
        if token is None or not services.quotas.try_take(quota):
            return None  # the general path refreshes, or refuses (and reports) the request
        return services, principal, target, token, now

    def _serve(
        self,
        request: web.Request,
        started: float,
        services: Services,
        principal: Principal,
        target: Target,
        token: Credentials,
        now: float,
    ) -> web.StreamResponse:
        """The reply, audit record, log lines and metrics of a cache hit, as the general path's."""
        self.served += 1
        request_id = request[REQUEST_ID] = new_request_id()
        context = request_context.begin(request_id, ROUTE, request.remote)
        context.principal, context.policy = principal, request.match_info["policy"]
        try:
            response, lines = self._hand_out(request, services, principal, target, token, now)
        except Exception:  # as request_context would: a JSON 500, counted and logged
            log.exception("request_crashed")
            err = BrokerError()
            response = reply_error(request, err, request_id)
            finish_request(request, ROUTE, err.status, err.code, time.perf_counter() - started)
            return response
        elapsed = time.perf_counter() - started
        services.metrics.request_finished(ROUTE, 200, elapsed)
        if lines is None:
            log_finished(request, 200, None, elapsed)
        else:
            varying = hot_log.varying_json({"duration_ms": round(elapsed * 1000, 3)})
            hot_log.finish(lines.route, lines.finished, varying, lines.bound, context)
        return response

    def _hand_out(
        self,
        request: web.Request,
        services: Services,
        principal: Principal,
        target: Target,
        token: Credentials,
        now: float,
    ) -> tuple[web.Response, _Lines | None]:
        """Count the hit, audit and log it; the reply, and the log lines kept for this token."""
        services.cache.stats.hits += 1
        request_id = request[REQUEST_ID]
        expires_in = int(token.expires_at - now)
        kept = self._kept(request, services, principal, target, token)
        _audit(services, principal, kept, request_id, expires_in)
        lines = _current(kept)
        if lines is None:
            fields = issued_fields(target.scope, token, "hit")
            hot_log.emit("credentials_issued", fields, {"expires_in": expires_in})
        else:
            context = request_context.current()
            hot_log.finish(
                lines.route, lines.issued, f'"expires_in":{expires_in}', lines.bound, context
            )
        replies = request.app[REPLIES]
        body = replies.body(token, target.scope, target.endpoint, expires_in, request_id, now)
        response = json_response(body, no_store=True)
        response.headers["X-Request-Id"] = request_id
        return response, lines

    def _kept(
        self,
        request: web.Request,
        services: Services,
        principal: Principal,
        target: Target,
        token: Credentials,
    ) -> _Kept:
        """What is kept for this target, token, address and path, rendered now if need be."""
        found = self._kept_by_target.get(id(target))
        if (
            found is not None
            and found.target is target
            and found.token is token
            and found.address == request.remote
            and found.path == request.path
        ):
            return found
        record = services.audit.record_parts(
            "credentials_issued",
            principal,
            target.scope,
            token,
            cache="hit",
            expiration=token.expiration_iso(),
        )
        kept = _Kept(target, token, request.remote, request.path, record, None)
        kept.lines = _rendered_lines(kept)
        if len(self._kept_by_target) >= _MAX_KEPT:
            self._kept_by_target.clear()
        self._kept_by_target[id(target)] = kept
        return kept


def _audit(
    services: Services, principal: Principal, kept: _Kept, request_id: str, expires_in: int
) -> None:
    """The issuance's audit record, from ``kept``'s parts when it has them."""
    if kept.record is not None:
        services.audit.handed_parts("credentials_issued", kept.record, request_id, expires_in)
        return
    services.audit.handed(
        "credentials_issued",
        principal,
        kept.target.scope,
        kept.token,
        cache="hit",
        expiration=kept.token.expiration_iso(),
        expires_in=expires_in,
    )


def _current(kept: _Kept) -> _Lines | None:
    """``kept``'s lines if they hold for the log route now; ``None``: ``emit``'s way."""
    current = hot_log.line_route()
    if current is None:
        return None
    lines = kept.lines
    if lines is None or lines.route is not current[0] or lines.bound != current[1]:
        lines = kept.lines = _rendered_lines(kept)
    return lines


def _rendered_lines(kept: _Kept) -> _Lines | None:
    """The starts of ``kept``'s two lines for the log route now (``None`` if not rendered)."""
    current = hot_log.line_route()
    if current is None:
        return None
    route, bound = current
    fields = issued_fields(kept.target.scope, kept.token, "hit")
    finished = finished_fields("GET", kept.path, 200, None)  # the lane takes GETs only
    issued = hot_log.line_start("credentials_issued", fields, bound)
    finished_start = hot_log.line_start("request_finished", finished, bound)
    if not issued or not finished_start:
        return None
    return _Lines(route, bound, issued, finished_start)
