"""Rate limits: per-caller request quotas and the global STS AssumeRole call budget.

STS allows about 100 AssumeRole calls a second per Alibaba Cloud account,
shared by everything in that account, and answers ``Throttling.Api`` beyond
that.  ``StsBudget`` keeps this broker well under it (20/s by default) by
queueing calls FIFO for a bounded time and refusing the rest with a 503;
``CallerQuotas`` stops one caller from using up everyone's share with a 429.
Both are token buckets on an injected clock, so tests move time by hand.
"""

from __future__ import annotations

import asyncio
import math
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from broker.errors import TooManyRequests, UpstreamThrottled
from broker.models import Clock

__all__ = ["DEFAULT_STS_CALLS_PER_SECOND", "CallerQuotas", "StsBudget", "TokenBucket"]

DEFAULT_STS_CALLS_PER_SECOND = 20.0
"""Well under STS's ~100 AssumeRole calls/s, which the whole account shares."""

Sleep = Callable[[float], Awaitable[None]]


def _whole_seconds(wait: float) -> int:
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
        wait = self.delay(cost)
        if wait == 0.0:
            self._tokens -= cost
        return wait

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


class CallerQuotas:
    """One token bucket per caller id, in a bounded LRU.

    A bucket that has refilled completely is indistinguishable from a new
    one, so idle callers are dropped from the old end as they refill.  Past
    ``max_callers`` the least recently seen caller is dropped even if its
    bucket is not full (it then starts over with a full burst): memory stays
    bounded whatever the number of distinct callers.
    """

    def __init__(
        self, rate_per_second: float, burst: float, clock: Clock, max_callers: int = 100_000
    ) -> None:
        if max_callers < 1 or burst < 1:
            raise ValueError("max_callers and burst must be at least 1")
        self._rate = rate_per_second
        self._burst = burst
        self._clock = clock
        self._max_callers = max_callers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        TokenBucket(rate_per_second, burst, clock)  # validate the parameters now

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, caller: str) -> None:
        """Count one request by ``caller``; raise ``TooManyRequests`` if over its quota."""
        wait = self._bucket(caller).take()
        self._drop_idle()
        if wait > 0.0:
            raise TooManyRequests(retry_after=_whole_seconds(wait), caller=caller)

    def _bucket(self, caller: str) -> TokenBucket:
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = TokenBucket(self._rate, self._burst, self._clock)
            self._buckets[caller] = bucket
        self._buckets.move_to_end(caller)
        return bucket

    def _drop_idle(self) -> None:
        # LRU order is last-use order, so the first bucket not yet full ends the scan.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if not oldest.is_full() and len(self._buckets) <= self._max_callers:
                return
            self._buckets.popitem(last=False)


class StsBudget:
    """The global AssumeRole budget: ``rate_per_second`` calls a second, ``burst`` at once.

    Callers over the budget queue in arrival order (each reserves the next
    free slot, then sleeps until it is due) for at most ``max_wait_seconds``;
    a caller that would wait longer is refused at once with
    ``UpstreamThrottled`` (503 + Retry-After) and reserves nothing.  That
    refusal is marked ``retryable=False``: retrying our own load shedding
    would only lengthen the queue.
    """

    def __init__(
        self,
        rate_per_second: float,
        burst: float,
        clock: Clock,
        max_wait_seconds: float = 2.0,
        sleep: Sleep = asyncio.sleep,
        on_reject: Callable[[], None] | None = None,
    ) -> None:
        self._bucket = TokenBucket(rate_per_second, burst, clock)
        self._max_wait = max_wait_seconds
        self._sleep = sleep
        self._on_reject = on_reject

    async def acquire(self) -> None:
        """Wait (bounded, FIFO) for a slot to call STS, or raise ``UpstreamThrottled``."""
        wait = self._bucket.delay()
        if wait > self._max_wait:
            if self._on_reject is not None:
                self._on_reject()
            raise UpstreamThrottled(
                "STS call budget exhausted",
                retry_after=_whole_seconds(wait),
                retryable=False,
                budget_per_second=self._bucket.rate,
            )
        self._bucket.reserve()
        if wait > 0.0:
            await self._sleep_or_refund(wait)

    def available(self) -> float:
        """Calls that could be made right now without waiting."""
        return self._bucket.available()

    async def _sleep_or_refund(self, wait: float) -> None:
        try:
            await self._sleep(wait)
        except asyncio.CancelledError:
            self._bucket.refund()  # the caller went away: its slot is free again
            raise
