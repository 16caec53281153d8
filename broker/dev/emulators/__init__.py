"""Local stand-ins for Alibaba Cloud STS and OSS that speak the real wire protocols."""

from __future__ import annotations

from aiohttp import web

__all__ = ["serve_app"]


async def serve_app(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on ``host:port`` (0 picks a free port); returns the runner and base URL.

    No access log: request lines can carry signatures and security tokens.
    """
    runner = web.AppRunner(app, shutdown_timeout=2.0, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]
    bracketed = f"[{host}]" if ":" in host else host
    return runner, f"http://{bracketed}:{bound_port}"
