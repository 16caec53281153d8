"""Redis that never fails a request, and the STS call budget the fleet shares through it.

``SharedRedis`` runs every command of the shared cache and budget within
``operation_timeout_seconds`` and without client retries.  When Redis fails
it raises ``SharedCacheUnavailable`` so the caller falls back (to STS, or to
the local budget), counts it in ``broker_shared_cache_degraded_total``, logs
``shared_cache_degraded`` at most every 30 s, and leaves Redis alone for
``_RETRY_REDIS_SECONDS`` before trying again.

``SharedStsBudget`` keeps ``broker.quotas.StsBudget``'s contract (callers
over the budget queue FIFO for at most ``max_wait_seconds``, the rest get
``UpstreamThrottled`` with ``retryable=False``), but the bucket is one Redis
hash that a Lua script refills and takes from atomically, so
``quotas.sts_calls_per_second`` is the budget of the whole fleet.  Time is the
injected clock of each broker, passed in as an argument; the bucket never
steps back in time.  While Redis is unavailable each broker falls back to its
own local bucket (the parent class) with the same numbers.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
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
from broker.errors import ConfigError, UpstreamThrottled
from broker.metrics import Metrics
from broker.models import Clock
from broker.quotas import StsBudget

__all__ = ["SharedCacheUnavailable", "SharedRedis", "SharedStsBudget", "connect_redis"]

log = structlog.get_logger("broker.credentials.redis")

T = TypeVar("T")

_RETRY_REDIS_SECONDS = 1.0
_LOG_EVERY_SECONDS = 30.0

# KEYS[1]: the bucket.  ARGV: rate, burst, now, max_wait, cost (a negative cost refunds).
# Returns {1, wait} when ``cost`` tokens were taken (possibly into debt, due in ``wait``
# seconds), {0, wait} when the wait would exceed max_wait (nothing taken).  Numbers go
# back as strings: Redis truncates Lua numbers to integers.
_TAKE_LUA = """
local rate, burst = tonumber(ARGV[1]), tonumber(ARGV[2])
local now, max_wait, cost = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at')
local tokens = tonumber(state[1]) or burst
local at = tonumber(state[2]) or now
if now > at then
  tokens = math.min(burst, tokens + (now - at) * rate)
  at = now
end
local wait = 0
if cost > 0 and tokens < cost then wait = (cost - tokens) / rate end
if wait > max_wait then return {0, tostring(wait)} end
tokens = math.min(burst, tokens - cost)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'at', tostring(at))
redis.call('PEXPIRE', KEYS[1], math.ceil(((burst - tokens) / rate + 1) * 1000))
return {1, tostring(wait)}
"""


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
        metrics: Metrics,
        *,
        operation_timeout_seconds: float = 0.25,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.client = client
        self._timeout = operation_timeout_seconds
        counter = Counter(
            "broker_shared_cache_degraded",
            "Redis operations that failed or were skipped, so STS or the local budget was used",
            ["operation"],
            registry=metrics.registry,
        )
        self._health = _Health(counter, monotonic)

    async def run(self, operation: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        """``command(client)`` within the timeout; ``SharedCacheUnavailable`` if Redis fails."""
        if not self._health.available():
            self._health.bypassed(operation)
            raise SharedCacheUnavailable(operation)
        try:
            async with asyncio.timeout(self._timeout):
                result = await command(self.client)
        except (RedisError, OSError) as err:  # TimeoutError is an OSError
            self._health.failed(operation, err)
            raise SharedCacheUnavailable(operation) from err
        self._health.succeeded()
        return result

    async def close(self) -> None:
        """Close the client's connections."""
        await self.client.aclose()


def connect_redis(
    settings: RedisSettings, metrics: Metrics, environ: Mapping[str, str]
) -> SharedRedis:
    """A guarded client for ``settings`` (it connects on first use; commands are not retried)."""
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
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(NoBackoff(), 0),  # we fall back to STS rather than retry
    )
    return SharedRedis(client, metrics, operation_timeout_seconds=timeout)


class SharedStsBudget(StsBudget):
    """``StsBudget`` for the fleet: one bucket at ``key`` in Redis, the local one as fallback."""

    def __init__(
        self,
        redis: SharedRedis,
        key: str,
        rate_per_second: float,
        burst: float,
        clock: Clock,
        max_wait_seconds: float = 2.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        on_reject: Callable[[], None] | None = None,
        *,
        fallback_rate_per_second: float | None = None,
        fallback_burst: float | None = None,
    ) -> None:
        # The local bucket is the fallback while Redis is down: this process's share only.
        super().__init__(
            fallback_rate_per_second or rate_per_second,
            fallback_burst or burst,
            clock,
            max_wait_seconds,
            sleep,
            on_reject,
        )
        self._redis = redis
        self._key = key
        self._rate = rate_per_second
        self._burst = burst
        self._clock = clock
        self._max_wait_seconds = max_wait_seconds
        self._pause = sleep
        self._rejected = on_reject
        self._script = redis.client.register_script(_TAKE_LUA)

    async def acquire(self) -> None:
        """Wait (bounded, FIFO) for a slot of the fleet's budget, or raise ``UpstreamThrottled``."""
        try:
            granted, wait = await self._take(1.0, self._max_wait_seconds)
        except SharedCacheUnavailable:
            await super().acquire()  # Redis is down: this process's own bucket
            return
        if not granted:
            self._reject(wait)
        if wait > 0.0:
            await self._sleep_or_give_back(wait)

    async def _take(self, cost: float, max_wait: float) -> tuple[bool, float]:
        args: list[str | float] = [self._rate, self._burst, self._clock(), max_wait, cost]
        reply = await self._redis.run("budget", lambda client: self._call(client, args))
        granted, wait = reply
        return bool(int(granted)), float(wait)

    async def _call(self, client: Redis, args: list[str | float]) -> list[bytes]:
        reply: list[bytes] = await self._script(keys=[self._key], args=args, client=client)
        return reply

    def _reject(self, wait: float) -> None:
        if self._rejected is not None:
            self._rejected()
        raise UpstreamThrottled(
            "STS call budget exhausted",
            retry_after=max(1, math.ceil(round(wait, 6))),
            retryable=False,
            budget_per_second=self._rate,
            shared=True,
        )

    async def _sleep_or_give_back(self, wait: float) -> None:
        try:
            await self._pause(wait)
        except asyncio.CancelledError:
            with contextlib.suppress(SharedCacheUnavailable):
                await self._take(-1.0, 0.0)  # the caller went away: its slot is free again
            raise
