"""CORS for browser apps: an exact allowlist of origins, nothing implied.

An origin is allowed only if it equals one configured origin exactly
(scheme, host and port), so ``https://app.example.com.evil.com``,
``http://app.example.com`` (a scheme downgrade) and ``null`` never match.
The broker uses bearer tokens, never cookies, so it never sends
``Access-Control-Allow-Credentials`` and never ``*``.
"""

from __future__ import annotations

from collections.abc import Iterable

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from broker.errors import AccessDenied

__all__ = ["ALLOWED_HEADERS", "ALLOWED_METHODS", "CorsRejected", "cors_middleware", "is_preflight"]

ALLOWED_METHODS = frozenset({"GET", "POST"})
ALLOWED_HEADERS = frozenset({"authorization", "content-type", "x-request-id"})
_EXPOSED = "X-Request-Id, Retry-After"
_MAX_AGE_SECONDS = "600"


class CorsRejected(AccessDenied):
    """A preflight from an origin, method or header the deployment does not allow."""

    code = "CorsRejected"
    fmt = "cross-origin request not allowed"


def cors_middleware(allow_origins: Iterable[str]) -> Middleware:
    """A middleware answering preflights and tagging replies for allowed origins."""
    allowed = frozenset(origin.lower().rstrip("/") for origin in allow_origins)

    @web.middleware
    async def cors(request: web.Request, handler: Handler) -> web.StreamResponse:
        origin = request.headers.get("Origin")
        if origin is None:
            return await handler(request)
        permitted = origin.lower() in allowed
        if is_preflight(request):
            return _preflight(request, origin, permitted)
        response = await handler(request)
        response.headers.add("Vary", "Origin")
        if permitted:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Expose-Headers"] = _EXPOSED
        return response

    return cors


def is_preflight(request: web.Request) -> bool:
    """Whether ``request`` is a CORS preflight (``OPTIONS`` asking for a method)."""
    return request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers


def _preflight(request: web.Request, origin: str, permitted: bool) -> web.StreamResponse:
    method = request.headers["Access-Control-Request-Method"].upper()
    raw = request.headers.get("Access-Control-Request-Headers", "")
    asked = {name.strip().lower() for name in raw.split(",") if name.strip()}
    if not permitted or method not in ALLOWED_METHODS or not asked <= ALLOWED_HEADERS:
        raise CorsRejected()
    return web.Response(
        status=204,
        headers={
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": ", ".join(sorted(ALLOWED_METHODS)),
            "Access-Control-Allow-Headers": ", ".join(sorted(ALLOWED_HEADERS)),
            "Access-Control-Max-Age": _MAX_AGE_SECONDS,
            "Vary": "Origin",
        },
    )
