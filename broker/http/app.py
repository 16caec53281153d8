"""``make_app()``: every route and every cleanup context, in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from broker.admin import admin_channel
from broker.http import routes
from broker.http.admissions import Admissions
from broker.http.connections import BrokerRunner, runner_options, ssl_context
from broker.http.cors import cors_middleware
from broker.http.keys import ADMISSIONS, REPLIES, SERVICES
from broker.http.middleware import request_context
from broker.http.replies import CredentialReplies
from broker.services import Services

# The runner, its options and the TLS context live in connections.py (how clients
# connect); they are named here too, beside the app they serve.
__all__ = ["BrokerRunner", "make_app", "runner_options", "ssl_context"]


def make_app(services: Services, *, demo: bool = False) -> web.Application:
    """The broker's aiohttp application.  The table of contents of the API.

    ``demo`` adds the dev-mode upload page at ``/demo`` (``sts-broker dev`` only),
    imported only then: ``serve`` never loads ``broker.dev``.
    """
    # request_context is outermost: every error below it becomes JSON.  CORS runs
    # only when origins are configured (without them a preflight is CorsRejected
    # by request_context, at no cost to other requests).
    origins = services.settings.cors.allow_origins
    middlewares = [request_context, *([cors_middleware(origins)] if origins else [])]
    app = web.Application(
        middlewares=middlewares, client_max_size=services.settings.listen.max_body_bytes
    )
    app[SERVICES] = services
    app[REPLIES] = CredentialReplies()
    app[ADMISSIONS] = Admissions()
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
    app.cleanup_ctx.append(_close_audit)
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


async def _close_audit(app: web.Application) -> AsyncIterator[None]:
    yield
    await app[SERVICES].audit.close()  # last: after every request has been answered
