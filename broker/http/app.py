"""``make_app()``: every route and every cleanup context, in one place."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from broker.admin import admin_channel
from broker.config import TlsSettings
from broker.errors import RequestInvalid
from broker.http import routes
from broker.http.cors import cors_middleware
from broker.http.keys import SERVICES
from broker.http.middleware import error_response, new_request_id, request_context
from broker.services import Services

__all__ = ["BrokerRunner", "make_app", "runner_options", "ssl_context"]


_PARSE_ERROR = "the request line or headers are malformed or too large"


def make_app(services: Services, *, demo: bool = False) -> web.Application:
    """The broker's aiohttp application.  The table of contents of the API.

    ``demo`` adds the dev-mode upload page at ``/demo`` (``sts-broker dev`` only),
    imported only then: ``serve`` never loads ``broker.dev``.
    """
    app = web.Application(
        # request_context is outermost: every error below it becomes JSON.
        middlewares=[request_context, cors_middleware(services.settings.cors.allow_origins)],
        client_max_size=services.settings.listen.max_body_bytes,
    )
    app[SERVICES] = services
    app.router.add_get("/v1/credentials/{policy}", routes.get_credentials, name="credentials")
    app.router.add_post("/v1/presign", routes.create_presigned_url, name="presign")
    app.router.add_post("/v1/post-policy", routes.create_post_policy, name="post_policy")
    app.router.add_get("/v1/policies", routes.list_policies, name="policies")
    app.router.add_get("/healthz", routes.healthz, name="healthz")
    app.router.add_get("/readyz", routes.readyz, name="readyz")
    app.router.add_get("/metrics", routes.metrics, name="metrics")
    app.router.add_get("/openapi.json", routes.openapi, name="openapi")
    if demo:
        from broker.dev.demo import demo_routes

        app.router.add_routes(demo_routes())
    app.cleanup_ctx.append(_close_cache)
    app.cleanup_ctx.append(_admin_channel)
    return app


async def _admin_channel(app: web.Application) -> AsyncIterator[None]:
    """The revocation listener (Redis) and the local admin socket (``admin.socket_dir``)."""
    async for _ in admin_channel(app[SERVICES]):
        yield


async def _close_cache(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[SERVICES].cache.close()


def runner_options(services: Services) -> dict[str, Any]:
    """Keyword arguments for ``web.AppRunner``: header limits, and no access log.

    aiohttp's access log would print query strings, which may carry
    ``access_token``; the middleware writes one redacted line per request instead.
    """
    max_header = services.settings.listen.max_header_bytes
    return {
        "access_log": None,
        "max_line_size": max_header,
        "max_field_size": max_header,
        "max_headers": 64,
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


class _QuietRequestHandler(RequestHandler):
    """aiohttp's protocol handler, minus echoing a malformed request head back.

    aiohttp answers an unparseable or oversized request line or header with a
    plain-text 400 that quotes the offending bytes, which may be an
    ``Authorization`` header or an ``access_token``.  This sends a fixed JSON
    error instead.
    """

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        response = super().handle_error(request, status, exc, _PARSE_ERROR)
        if status == 500:
            return response
        quiet = error_response(RequestInvalid(_PARSE_ERROR), new_request_id(), sts_compatible=False)
        quiet.set_status(status)  # the status aiohttp chose, with the one error body
        quiet.force_close()
        return quiet


class _QuietServer(web.Server):
    def __call__(self) -> RequestHandler:
        return _QuietRequestHandler(self, loop=self._loop, **self._kwargs)


class BrokerRunner(web.AppRunner):
    """``web.AppRunner`` whose connections never echo a malformed request head."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _QuietServer
        return server
