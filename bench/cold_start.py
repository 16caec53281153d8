"""1,000 concurrent cold requests for one scope at a freshly started broker."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass

import aiohttp

__all__ = ["ColdResult", "fire"]


@dataclass(frozen=True)
class ColdResult:
    """How the burst went: statuses, wall time until the last reply, per-request latencies."""

    statuses: Counter[int]
    seconds: float
    p50_ms: float
    max_ms: float

    @property
    def all_ok(self) -> bool:
        """True when every request was answered 200."""
        return set(self.statuses) == {200}


async def _one(
    session: aiohttp.ClientSession, url: str, headers: dict[str, str]
) -> tuple[int, float]:
    started = time.perf_counter()
    try:
        async with session.get(url, headers=headers) as reply:
            await reply.read()
            status = reply.status
    except (aiohttp.ClientError, TimeoutError):
        status = 0  # counted as a failure, never retried
    return status, (time.perf_counter() - started) * 1000


async def _burst(url: str, api_key: str, count: int, timeout_seconds: float) -> ColdResult:
    headers = {"Authorization": f"Bearer {api_key}"}
    connector = aiohttp.TCPConnector(limit=count, limit_per_host=count)
    timeout = aiohttp.ClientTimeout(total=timeout_seconds)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        results = await asyncio.gather(*(_one(session, url, headers) for _ in range(count)))
        seconds = time.perf_counter() - started
    latencies = [ms for _, ms in results]
    statuses = Counter(status for status, _ in results)
    return ColdResult(statuses, seconds, statistics.median(latencies), max(latencies))


def fire(url: str, api_key: str, count: int = 1000, timeout_seconds: float = 60.0) -> ColdResult:
    """Send ``count`` GETs to ``url`` at once (one connection each); wait for all of them."""
    return asyncio.run(_burst(url, api_key, count, timeout_seconds))
