"""The demo upload page of ``sts-broker dev``: ``GET /demo`` and its ``GET /favicon.ico``."""

from __future__ import annotations

from importlib.resources import files
from typing import Final

from aiohttp import web

__all__ = ["demo_page", "demo_routes"]

_PAGE_HEADERS: Final = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}
# A 16x16 SVG: browsers ask for /favicon.ico on every page; answering spares a console 404.
_FAVICON: Final = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="16" height="16" rx="3" fill="#1d2330"/>'
    b'<path d="M4 9l4-5 4 5H9v3H7V9z" fill="#7ee787"/></svg>'
)


def demo_routes() -> list[web.RouteDef]:
    """The demo page's routes, for ``make_app(..., demo=True)``."""
    return [
        web.get("/demo", _demo, name="demo"),
        web.get("/favicon.ico", _favicon, name="favicon"),
    ]


def demo_page() -> str:
    """The demo page's HTML (it reads the dev API key from the URL fragment)."""
    return files(__package__).joinpath("demo.html").read_text(encoding="utf-8")


async def _demo(request: web.Request) -> web.Response:
    """``GET /demo``: a page that uploads by presigned PUT and PostObject."""
    return web.Response(text=demo_page(), content_type="text/html", headers=_PAGE_HEADERS)


async def _favicon(request: web.Request) -> web.Response:
    """``GET /favicon.ico``: the page's icon, as SVG."""
    return web.Response(
        body=_FAVICON, content_type="image/svg+xml", headers={"Cache-Control": "max-age=86400"}
    )
