"""The baseline: an aiohttp hello-world whose JSON replies are padded to the broker's sizes.

Run as ``python bench/hello.py --get-bytes N --post-bytes M``.  It answers
``GET /v1/credentials/{policy}`` with an N-byte JSON body and
``POST /v1/presign`` (after reading the request body) with an M-byte one, so
wrk moves the same bytes as against the broker and the only difference is
the broker's own work.  Prints its URL on stdout, serves until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web
from serving import serve_until_stopped

__all__ = ["main", "padded_json"]

_SKELETON = b'{"Code":"Success","Pad":""}'


def padded_json(size: int) -> bytes:
    """A valid JSON object of exactly ``size`` bytes."""
    if size < len(_SKELETON):
        raise ValueError(f"a padded body needs at least {len(_SKELETON)} bytes")
    return _SKELETON[:-2] + b"x" * (size - len(_SKELETON)) + _SKELETON[-2:]


def _app(get_body: bytes, post_body: bytes) -> web.Application:
    async def credentials(_request: web.Request) -> web.Response:
        return web.Response(body=get_body, content_type="application/json")

    async def presign(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=post_body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/v1/credentials/{policy}", credentials)
    app.router.add_post("/v1/presign", presign)
    return app


async def _serve(port: int, get_bytes: int, post_bytes: int) -> None:
    app = _app(padded_json(get_bytes), padded_json(post_bytes))
    runner = web.AppRunner(app, access_log=None)  # the broker runs without one too
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    bound = runner.addresses[0][1]
    await serve_until_stopped(runner, f"http://127.0.0.1:{bound}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--get-bytes", type=int, required=True)
    parser.add_argument("--post-bytes", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.get_bytes, args.post_bytes))


if __name__ == "__main__":
    main()
