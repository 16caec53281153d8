"""The Redis connection of the shared cache and budget: every command bounded, none fatal.

``SharedRedis`` runs each command within ``operation_timeout_seconds`` and
without client retries.  The timeout measures Redis, not this process: time
the event loop spent elsewhere past the deadline (a busy loop, or a process the
OS did not run on a loaded machine) is given back, a bounded number of times,
so a healthy Redis is not taken for a dead one (``_within``).  When Redis
fails it raises ``SharedCacheUnavailable`` so the caller falls back (to STS,
or to the local budget), counts it in ``broker_shared_cache_degraded_total``
(the counter ``broker.metrics`` defines and passes in), logs
``shared_cache_degraded`` at most every 30 s, and leaves Redis alone for
``_RETRY_REDIS_SECONDS`` before trying again.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TypeVar

import structlog
from prometheus_client import Counter
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from broker.config import RedisSettings
from broker.errors import ConfigError

__all__ = ["SharedCacheUnavailable", "SharedRedis", "connect_redis"]

log = structlog.get_logger("broker.credentials.redis")

T = TypeVar("T")

_RETRY_REDIS_SECONDS = 1.0
_LOG_EVERY_SECONDS = 30.0
_LATE_SECONDS = 0.02
"""A deadline seen later than this means the loop was busy elsewhere, not that Redis was slow."""
_MAX_EXTENSIONS = 4


class SharedCacheUnavailable(Exception):
    """Redis failed, timed out or is being left alone for a moment; callers fall back."""


class _Health:
    """Whether to try Redis now; counts each bypass and logs it at most every 30 s."""

    def __init__(self, counter: Counter, monotonic: Callable[[], float]) -> None:
        self._counter = counter
        self._monotonic = monotonic
        self._skip_until = 0.0
        self._next_log = 0.0
        self._down = False

    def available(self) -> bool:
        return self._monotonic() >= self._skip_until

    def failed(self, operation: str, err: BaseException) -> None:
        self._skip_until = self._monotonic() + _RETRY_REDIS_SECONDS
        self._down = True
        self.bypassed(operation, type(err).__name__)

    def bypassed(self, operation: str, error: str = "skipped") -> None:
        self._counter.labels(operation).inc()
        now = self._monotonic()
        if now >= self._next_log:
            self._next_log = now + _LOG_EVERY_SECONDS
            log.warning("shared_cache_degraded", operation=operation, error=error)

    def succeeded(self) -> None:
        if self._down:
            self._down = False
            log.info("shared_cache_recovered")


class SharedRedis:
    """One Redis client for the shared cache and budget; every command bounded and guarded."""

    def __init__(
        self,
        client: Redis,
        degraded: Counter,
        *,
        operation_timeout_seconds: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self._timeout = operation_timeout_seconds
        self._health = _Health(degraded, monotonic)

    async def run(self, operation: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """``command(client)`` within the timeout; ``SharedCacheUnavailable`` if Redis fails."""
        if not self._health.available():
            self._health.bypassed(operation)
            raise SharedCacheUnavailable(operation)
        try:
            result = await _within(command(self.client), self._timeout)
        except (RedisError, OSError) as err:  # TimeoutError is an OSError
            self._health.failed(operation, err)
            raise SharedCacheUnavailable(operation) from err
        self._health.succeeded()
        return result

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


async def _within(command: Awaitable[T], seconds: float) -> T:
    """``command``'s result, or ``TimeoutError`` once Redis has had ``seconds`` to answer.

    ``asyncio.timeout`` alone measures this process as much as Redis: when a
    busy loop (300 requests arriving at once on a loaded machine) reaches a
    command's deadline late, a command that needs a few more turns of the loop
    (connect, handshake, reply) is cancelled at the first of them, though Redis
    answered each step at once.  Here, when the loop saw the deadline later than
    ``_LATE_SECONDS``, the command gets another ``seconds``, at most
    ``_MAX_EXTENSIONS`` times; on a responsive loop a silent Redis still costs
    ``seconds``, and under any load at most ``(1 + _MAX_EXTENSIONS) * seconds``
    plus the time the loop was away.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.ensure_future(command)
    try:
        for _ in range(1 + _MAX_EXTENSIONS):
            deadline = loop.time() + seconds
            done, _ = await asyncio.wait({task}, timeout=seconds)
            if done:
                return task.result()
            if loop.time() - deadline <= _LATE_SECONDS:
                break  # the loop was listening at the deadline: Redis had its time
            # How much of the window the loop spent elsewhere is unknown: a fresh one.
        raise TimeoutError(f"Redis did not answer within {seconds} s")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.wait({task})  # redis-py drops a connection cut mid-reply
            if not task.cancelled():
                task.exception()  # retrieved: what it raised while being cut off is moot


def connect_redis(
    settings: RedisSettings, degraded: Counter, environ: Mapping[str, str]
) -> SharedRedis:
    """A guarded client for ``settings`` (it connects on first use; commands are not retried).

    ``degraded`` counts the operations that failed or were skipped, by operation.
    """
    password = None
    if settings.password_env is not None:
        password = environ.get(settings.password_env)
        if not password:
            name = settings.password_env
            raise ConfigError([f"cache.redis.password_env: environment variable {name} is not set"])
    timeout = settings.operation_timeout_seconds
    client = Redis.from_url(
        settings.url,
        password=password,
        # No socket timeouts of redis-py's own: plain ``asyncio.timeout``s, they
        # would cut replies short on a busy loop; ``SharedRedis.run`` bounds every command.
        socket_timeout=None,
        socket_connect_timeout=None,
        retry=Retry(NoBackoff(), 0),  # we fall back to STS rather than retry
    )
    return SharedRedis(client, degraded, operation_timeout_seconds=timeout)
