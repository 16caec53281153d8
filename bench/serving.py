"""Server side of the benchmark's helper processes: print the URL, serve until SIGTERM."""

from __future__ import annotations

import asyncio
import signal

from aiohttp import web

__all__ = ["serve_until_stopped"]


async def serve_until_stopped(runner: web.AppRunner, url: str) -> None:
    """Print ``url`` on stdout (the parent waits for it), then serve until SIGTERM/SIGINT."""
    print(url, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
