"""The dev-mode demo upload page, served only by ``sts-broker dev``."""

from __future__ import annotations

from importlib.resources import files

from aiohttp import web

__all__ = ["demo_routes"]


def demo_routes() -> list[web.RouteDef]:
    """The demo page's routes, for ``make_app(demo=True)``."""
    return [web.get("/demo", _demo, name="demo")]


async def _demo(request: web.Request) -> web.Response:
    """``GET /demo``: a page that uploads by presigned PUT and PostObject."""
    html = files("broker.dev").joinpath("demo.html").read_text(encoding="utf-8")
    return web.Response(
        text=html,
        content_type="text/html",
        headers={"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"},
    )
