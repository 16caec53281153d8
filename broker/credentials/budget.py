"""The STS call budget: token buckets (this process's or the fleet's), a bounded FIFO queue.

STS allows about 100 AssumeRole calls a second per Alibaba Cloud account,
shared by everything in that account, and answers ``Throttling.Api`` beyond
that.  ``StsBudget`` keeps the broker well under it (``quotas.sts_calls_per_second``,
20/s by default) by queueing calls FIFO for at most ``max_wait_seconds`` and
refusing the rest at once with ``UpstreamThrottled`` (503 + Retry-After),
marked ``retryable=False``: retrying our own load shedding would only
lengthen the queue.

Where the tokens live is the budget's one moving part.  By default it is the
budget's own ``TokenBucket``.  Given a ``SharedBucket`` (``cache.backend:
redis`` with ``share_sts_budget``), the tokens are one Redis hash that a Lua
script refills and takes from atomically, so the rate is the whole fleet's;
while Redis is unavailable the budget falls back to its own bucket, sized to
this process's share.  Time is the injected clock, so tests move it by hand;
neither bucket ever steps back in time.

The same Lua bucket (``RedisTokenBuckets``) also holds the per-caller STS
allowance of ``broker.quotas.CallerStsQuota``, one Redis hash per caller.
Since that allowance counts STS calls a caller *causes*, the budget also
tells who caused one: each slot it grants is counted in the ``StsCalls`` of
the fetch it runs in (``count_sts_calls``, a context variable the credential
cache sets in each fetch task), so a fetch that never reached STS (the shared
cache answered, the failure gate or the budget refused) costs its caller nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Protocol

from redis.asyncio import Redis

from broker.credentials.redis import SharedCacheUnavailable, SharedRedis
from broker.errors import UpstreamThrottled
from broker.models import Clock

__all__ = [
    "RedisTokenBuckets",
    "SharedBucket",
    "StsBudget",
    "StsCalls",
    "TokenBucket",
    "count_sts_calls",
    "whole_seconds",
]

Sleep = Callable[[float], Awaitable[None]]

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


@dataclass(slots=True)
class StsCalls:
    """STS call slots the budget granted for one fetch (retries included)."""

    count: int = 0


_sts_calls: ContextVar[StsCalls | None] = ContextVar("sts_calls", default=None)


def count_sts_calls() -> StsCalls:
    """Count, from now on in the current context, the slots ``StsBudget`` grants.

    Call it first thing in a task of its own (a task runs in a copy of its
    creator's context, so the counter stays with that task and what it awaits).
    """
    calls = StsCalls()
    _sts_calls.set(calls)
    return calls


def whole_seconds(wait: float) -> int:
    """A wait as a Retry-After value: whole seconds, rounded up, at least 1."""
    return max(1, math.ceil(round(wait, 6)))


class TokenBucket:
    """``rate`` tokens a second, holding at most ``burst``; starts full.

    ``reserve`` may leave the bucket in debt (negative tokens): that is how
    queued callers get successive, FIFO-ordered slots.
    """

    def __init__(self, rate: float, burst: float, clock: Clock) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("token bucket rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._tokens = burst
        self._updated_at = clock()

    def available(self) -> float:
        """Tokens that could be taken right now (never negative)."""
        self._refill()
        return max(0.0, self._tokens)

    def is_full(self) -> bool:
        """True once the bucket has refilled to ``burst``: it is then as good as new."""
        self._refill()
        return self._tokens >= self.burst

    def delay(self, cost: float = 1.0) -> float:
        """Seconds until ``cost`` tokens are available; takes nothing."""
        self._refill()
        if self._tokens >= cost:
            return 0.0
        return (cost - self._tokens) / self.rate

    def take(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens: 0.0 if allowed, else seconds until they are available."""
        if cost > self.burst:
            raise ValueError(f"cost {cost} exceeds the bucket's burst {self.burst}")
        self._refill()
        if self._tokens >= cost:
            self._tokens -= cost
            return 0.0
        return (cost - self._tokens) / self.rate

    def reserve(self, cost: float = 1.0) -> float:
        """Take ``cost`` tokens now, into debt if need be; returns the wait until they are due."""
        wait = self.delay(cost)
        self._tokens -= cost
        return wait

    def refund(self, cost: float = 1.0) -> None:
        """Give back tokens reserved but not used (never beyond ``burst``)."""
        self._refill()
        self._tokens = min(self.burst, self._tokens + cost)

    def _refill(self) -> None:
        now = self._clock()
        elapsed = max(0.0, now - self._updated_at)  # a clock stepping back adds nothing
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated_at = now


class _Slots(Protocol):
    """Where an ``StsBudget`` reserves its slots: its own bucket, or the fleet's."""

    @property
    def rate(self) -> float:
        """Calls a second this bucket allows."""
        ...

    @property
    def shared(self) -> bool:
        """True for the fleet's bucket (named in the refusal's log context)."""
        ...

    async def reserve(self, max_wait_seconds: float) -> tuple[bool, float]:
        """Take one slot unless it is due later than ``max_wait_seconds``: (taken, wait)."""
        ...

    async def give_back(self) -> None:
        """Return a slot reserved but not used."""
        ...


class _LocalSlots:
    """This process's own ``TokenBucket``."""

    shared = False

    def __init__(self, bucket: TokenBucket) -> None:
        self.bucket = bucket

    @property
    def rate(self) -> float:
        return self.bucket.rate

    async def reserve(self, max_wait_seconds: float) -> tuple[bool, float]:
        # No await in here: reserving is atomic, so queued callers keep their order.
        wait = self.bucket.delay()
        if wait > max_wait_seconds:
            return False, wait
        self.bucket.reserve()
        return True, wait

    async def give_back(self) -> None:
        self.bucket.refund()


class RedisTokenBuckets:
    """Token buckets in Redis, one hash per key, refilled and taken atomically by a Lua script.

    ``take`` raises ``SharedCacheUnavailable`` when Redis fails; a key's hash
    expires once its bucket would be full again.
    """

    def __init__(self, redis: SharedRedis, clock: Clock) -> None:
        self._redis = redis
        self._clock = clock
        self._script = redis.client.register_script(_TAKE_LUA)

    async def take(
        self, key: str, rate: float, burst: float, *, max_wait: float = 0.0, cost: float = 1.0
    ) -> tuple[bool, float]:
        """Take ``cost`` tokens unless they are due later than ``max_wait``: (taken, wait).

        A negative ``cost`` gives tokens back (never beyond ``burst``).
        """
        args: list[str | float] = [rate, burst, self._clock(), max_wait, cost]
        granted, wait = await self._redis.run(
            "budget", lambda client: self._call(client, key, args)
        )
        return bool(int(granted)), float(wait)

    async def _call(self, client: Redis, key: str, args: list[str | float]) -> list[bytes]:
        reply: list[bytes] = await self._script(keys=[key], args=args, client=client)
        return reply


class SharedBucket:
    """The fleet's bucket: one Redis hash at ``key``; ``SharedCacheUnavailable`` if Redis fails."""

    shared = True

    def __init__(
        self, redis: SharedRedis, key: str, rate_per_second: float, burst: float, clock: Clock
    ) -> None:
        if rate_per_second <= 0 or burst <= 0:
            raise ValueError("token bucket rate and burst must be positive")
        self.rate = rate_per_second
        self.burst = burst
        self._key = key
        self._buckets = RedisTokenBuckets(redis, clock)

    async def reserve(self, max_wait_seconds: float) -> tuple[bool, float]:
        """Take one slot in Redis unless it is due later than ``max_wait_seconds``."""
        return await self._buckets.take(self._key, self.rate, self.burst, max_wait=max_wait_seconds)

    async def give_back(self) -> None:
        """Return a slot; if Redis is gone, the bucket refills by itself."""
        with contextlib.suppress(SharedCacheUnavailable):
            await self._buckets.take(self._key, self.rate, self.burst, cost=-1.0)


class StsBudget:
    """The AssumeRole budget: ``rate_per_second`` calls a second, ``burst`` at once.

    Callers over the budget queue in arrival order (each reserves the next
    free slot, then sleeps until it is due) for at most ``max_wait_seconds``;
    a caller that would wait longer is refused at once with
    ``UpstreamThrottled`` and reserves nothing.  With ``shared``, slots come
    from the fleet's bucket, and from this budget's own only while Redis is
    unavailable.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: float,
        clock: Clock,
        max_wait_seconds: float = 2.0,
        sleep: Sleep = asyncio.sleep,
        on_reject: Callable[[], None] | None = None,
        *,
        shared: SharedBucket | None = None,
    ) -> None:
        self._local = _LocalSlots(TokenBucket(rate_per_second, burst, clock))
        self._shared = shared
        self._max_wait = max_wait_seconds
        self._sleep = sleep
        self._on_reject = on_reject

    async def acquire(self) -> None:
        """Wait (bounded, FIFO) for a slot to call STS, or raise ``UpstreamThrottled``.

        A granted slot is counted in the current fetch's ``StsCalls``, if any.
        """
        slots, wait = await self._reserve()
        if wait > 0.0:
            try:
                await self._sleep(wait)
            except asyncio.CancelledError:
                await slots.give_back()  # the caller went away: its slot is free again
                raise
        calls = _sts_calls.get()
        if calls is not None:
            calls.count += 1

    def available(self) -> float:
        """Calls this process's own bucket could make right now without waiting."""
        return self._local.bucket.available()

    async def _reserve(self) -> tuple[_Slots, float]:
        if self._shared is not None:
            with contextlib.suppress(SharedCacheUnavailable):  # if so, our own bucket
                return self._shared, await self._take(self._shared)
        return self._local, await self._take(self._local)

    async def _take(self, slots: _Slots) -> float:
        granted, wait = await slots.reserve(self._max_wait)
        if granted:
            return wait
        if self._on_reject is not None:
            self._on_reject()
        shared = {"shared": True} if slots.shared else {}
        raise UpstreamThrottled(
            "STS call budget exhausted",
            retry_after=whole_seconds(wait),
            retryable=False,
            budget_per_second=slots.rate,
            **shared,
        )
