"""``sts-broker serve`` with parts of the request path stubbed out, to measure what each costs.

Used by ``bench/cost_breakdown.py`` only; never by the product.  ``VARIANT``:

* ``full``: the broker as shipped;
* ``no-lane``: the broker with its cached-credentials lane off (every request the general way);
* ``no-log``: the per-request log lines not written (``hot_log.emit`` a no-op);
* ``const``: the credentials handler replies a constant body (no auth, no use case);
* ``const-no-log``: both;
* ``bare``: a constant handler and a pass-through middleware instead of ``request_context``;
* ``const-log-unwritten``: ``const`` with each log line built and scrubbed but not written
  (what rendering costs apart from the writer thread).
"""

from __future__ import annotations

import os
import sys
from typing import Any

from aiohttp import web

import broker.cli as cli
import broker.hot_log as hot_log
import broker.http.app as app_module
import broker.http.fast_lane as fast_lane
import broker.http.routes as routes

_BODY = b'{"x":"' + b"a" * 1350 + b'"}'


async def _constant(_request: web.Request) -> web.Response:
    return web.Response(body=_BODY, headers={"Content-Type": "application/json"})


@web.middleware
async def _pass_through(request: web.Request, handler: Any) -> web.StreamResponse:
    response: web.StreamResponse = await handler(request)
    return response


def _lane_off() -> None:
    """Every ``FastLane`` made from now on sends every request the general way."""
    made = fast_lane.FastLane.__init__

    def init(self: fast_lane.FastLane, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        self.enabled = False

    fast_lane.FastLane.__init__ = init  # type: ignore[method-assign]


def _stub(variant: str) -> None:
    if variant != "full":  # every variant but the broker as shipped measures the general path
        _lane_off()
    if variant == "no-lane":
        return
    if variant == "const-log-unwritten":
        import broker.logs as logs

        real = logs.hot_route

        def route_without_writer() -> Any:
            found = real()
            return None if found is None else type(found)(found.processors, found.info_enabled, len)

        hot_log.hot_route = route_without_writer  # type: ignore[assignment]
        variant = "const"
    if variant in ("no-log", "const-no-log"):
        hot_log.emit = lambda event, fields, varying=None: None  # type: ignore[assignment]
    if variant in ("const", "const-no-log", "bare"):
        routes.get_credentials = _constant  # type: ignore[assignment]
    if variant == "bare":
        app_module.request_context = _pass_through  # type: ignore[assignment]


if __name__ == "__main__":
    _stub(os.environ.get("VARIANT", "full"))
    sys.argv = ["sts-broker", *sys.argv[1:]]
    sys.exit(cli.main())
