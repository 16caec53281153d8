"""The STS emulator in its own process: prints its base URL on stdout, serves until SIGTERM.

Run as ``python bench/sts_server.py [--port N]``.  The broker under test signs
its AssumeRole calls with ``ACCESS_KEY_ID`` / ``ACCESS_KEY_SECRET``; count them
with ``GET /__emulator__/calls``.
"""

from __future__ import annotations

import argparse
import asyncio

from serving import serve_until_stopped

from broker.dev.emulators.sts import StsEmulator, start_sts_emulator

__all__ = ["ACCESS_KEY_ID", "ACCESS_KEY_SECRET", "main"]

ACCESS_KEY_ID = "LTAI5tBenchBrokerIdentity"
ACCESS_KEY_SECRET = "bench-secret-not-a-real-key-0123456789"  # the emulator's own, not a real key


async def _serve(port: int) -> None:
    emulator = StsEmulator(access_keys={ACCESS_KEY_ID: ACCESS_KEY_SECRET})
    runner, url = await start_sts_emulator(emulator, port=port)
    await serve_until_stopped(runner, url)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(_serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
