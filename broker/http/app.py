"""``make_app()``: every route and every cleanup context, in one place."""

from __future__ import annotations

from collections.abc import AsyncIterator

from aiohttp import web

from broker.admin import admin_channel
from broker.http import fast_lane, routes
from broker.http.admissions import Admissions
from broker.http.connections import BrokerRunner, runner_options, ssl_context
from broker.http.cors import cors_middleware
from broker.http.fast_lane import FastLane
from broker.http.keys import ADMISSIONS, FAST_LANE, REPLIES, SERVICES
from broker.http.middleware import UNMATCHED_PATH, layered, request_context, unmatched
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
    # Every handler runs inside request_context (every error below it becomes JSON)
    # and, only when origins are configured, CORS; without them a preflight is
    # CorsRejected by request_context.  They wrap each handler (``layered``) rather
    # than run as aiohttp middlewares, which would add aiohttp's own per request.
    origins = services.settings.cors.allow_origins
    wrap = layered([request_context, *([cors_middleware(origins)] if origins else [])])
    app = web.Application(client_max_size=services.settings.listen.max_body_bytes)
    app[SERVICES] = services
    app[REPLIES] = CredentialReplies()
    app[ADMISSIONS] = Admissions()
    add_get, add_post = app.router.add_get, app.router.add_post
    # A cached credentials request of a known API-key caller is answered in one step;
    # the lane hands every other request to the general way (fast_lane.py).
    lane = app[FAST_LANE] = FastLane(wrap(routes.get_credentials), cors=bool(origins))
    add_get("/v1/credentials/{policy}", lane.handle, name=fast_lane.ROUTE)
    add_post("/v1/presign", wrap(routes.create_presigned_url), name="presign")
    add_post("/v1/post-policy", wrap(routes.create_post_policy), name="post_policy")
    add_get("/v1/policies", wrap(routes.list_policies), name="policies")
    add_get("/healthz", wrap(routes.healthz), name="healthz")
    add_get("/readyz", wrap(routes.readyz), name="readyz")
    add_get("/metrics", wrap(routes.metrics), name="metrics")
    add_get("/openapi.json", wrap(routes.openapi), name="openapi")
    if demo:
        from broker.dev.demo import demo_routes

        app.router.add_routes(
            [web.RouteDef(r.method, r.path, wrap(r.handler), r.kwargs) for r in demo_routes()]
        )
    # Last: whatever no route above takes, answered 404 (or 405) in the same JSON shape.
    app.router.add_route("*", UNMATCHED_PATH, wrap(unmatched))
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
