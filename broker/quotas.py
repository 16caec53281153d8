"""Per-caller protection: the STS calls a caller causes, and (off by default) its request rate.

Two quotas, both answering ``TooManyRequests`` (429 + Retry-After) to the one
caller over it, never to anyone else:

* ``CallerStsQuota`` (``quotas.caller_sts_calls_per_minute``, ``caller_sts_burst``):
  what STS calls a caller *causes*.  The credential cache charges it right
  before a request starts a fetch (a miss, or a ``min_ttl_seconds`` refresh,
  ``broker.credentials.cache``); cache hits, local signing, requests that join
  a fetch in flight and background refreshes cost nothing, and a fetch that
  made no STS call (the shared cache answered) is given back.  One of
  ``serve --workers N`` holds ``1/N`` of the allowance; with ``cache.backend:
  redis`` and ``share_sts_budget`` the allowance is the fleet's, one Redis
  bucket per caller (``broker.credentials.budget.RedisTokenBuckets``), and this
  process's share again while Redis is unavailable.
* ``CallerQuotas`` (``quotas.caller_requests_per_second``, ``caller_burst``):
  every authenticated request, counted per process.  Off unless configured.

Buckets live on the injected clock, so tests move time by hand.  The STS call
budget of the whole broker, the other limit, is ``broker.credentials.budget.StsBudget``.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from broker.credentials.budget import RedisTokenBuckets, TokenBucket, whole_seconds
from broker.credentials.cache import Charge
from broker.credentials.redis import SharedCacheUnavailable
from broker.errors import TooManyRequests
from broker.models import Clock

__all__ = ["CallerQuotas", "CallerStsQuota", "FleetBuckets"]

OnReject = Callable[[], None]


class _CallerBuckets:
    """One token bucket per caller id, in a bounded LRU.

    A bucket that has refilled completely is indistinguishable from a new
    one, so idle callers are dropped from the old end as they refill.  Past
    ``max_callers`` the least recently seen caller is dropped even if its
    bucket is not full (it then starts over with a full burst): memory stays
    bounded whatever the number of distinct callers.
    """

    def __init__(self, rate: float, burst: float, clock: Clock, max_callers: int) -> None:
        if max_callers < 1 or burst < 1:
            raise ValueError("max_callers and burst must be at least 1")
        TokenBucket(rate, burst, clock)  # validate the parameters now
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._max_callers = max_callers
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, caller: str) -> float:
        """Take one token from ``caller``'s bucket: 0.0, or the seconds until one is due."""
        wait = self._bucket(caller).take()
        if len(self._buckets) > 1:  # alone, the bucket just used is never dropped
            self._drop_idle()
        return wait

    def refund(self, caller: str) -> None:
        """Give ``caller`` back a token it took (a dropped bucket is full already)."""
        bucket = self._buckets.get(caller)
        if bucket is not None:
            bucket.refund()

    def _bucket(self, caller: str) -> TokenBucket:
        bucket = self._buckets.get(caller)
        if bucket is None:
            bucket = TokenBucket(self.rate, self.burst, self._clock)
            self._buckets[caller] = bucket  # added last: already the most recent
        else:
            self._buckets.move_to_end(caller)
        return bucket

    def _drop_idle(self) -> None:
        # LRU order is last-use order, so the first bucket not yet full ends the scan.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if not oldest.is_full() and len(self._buckets) <= self._max_callers:
                return
            self._buckets.popitem(last=False)


class CallerQuotas:
    """The request-rate quota: ``rate_per_second`` requests a second per caller, ``burst`` at once.

    ``rate_per_second`` None or 0 turns it off (the default): ``check`` then
    counts nothing.  ``burst`` defaults to one second's worth (at least 1).
    """

    def __init__(
        self,
        rate_per_second: float | None,
        burst: float | None,
        clock: Clock,
        max_callers: int = 100_000,
        *,
        on_reject: OnReject | None = None,
    ) -> None:
        self._buckets = None
        if rate_per_second:
            size = burst or max(1.0, rate_per_second)
            self._buckets = _CallerBuckets(rate_per_second, size, clock, max_callers)
        self._on_reject = on_reject

    @property
    def enabled(self) -> bool:
        """False when no request rate is configured."""
        return self._buckets is not None

    def __len__(self) -> int:
        return 0 if self._buckets is None else len(self._buckets)

    def try_take(self, caller: str) -> bool:
        """Count one request by ``caller`` if its quota allows; ``False`` (nothing counted) if not.

        For a caller that then goes on to ``check``, which refuses (and reports) the request.
        """
        return self._buckets is None or self._buckets.take(caller) == 0.0

    def check(self, caller: str) -> None:
        """Count one request by ``caller``; raise ``TooManyRequests`` if over its quota."""
        if self._buckets is None:
            return
        wait = self._buckets.take(caller)
        if wait > 0.0:
            if self._on_reject is not None:
                self._on_reject()
            raise TooManyRequests(retry_after=whole_seconds(wait), caller=caller)


@dataclass(frozen=True, slots=True)
class FleetBuckets:
    """Where the fleet's per-caller buckets live: Redis, under ``key_prefix``."""

    buckets: RedisTokenBuckets
    key_prefix: str

    def key(self, caller: str) -> str:
        """The Redis key of ``caller``'s bucket, by digest: caller input never names a key."""
        digest = hashlib.sha256(caller.encode()).hexdigest()
        return f"{self.key_prefix}caller-sts:{digest}"


class CallerStsQuota:
    """The STS calls each caller may cause: ``per_minute`` a minute, ``burst`` at once.

    ``process_share`` (``1/N`` for one of ``serve --workers N``) sizes this
    process's own buckets: all it has without ``fleet``, its fallback while
    the fleet's buckets in Redis are unreachable.  ``per_minute`` None or 0
    turns the quota off: ``charge`` then returns None.
    """

    def __init__(
        self,
        per_minute: float | None,
        burst: float,
        clock: Clock,
        *,
        process_share: float = 1.0,
        fleet: FleetBuckets | None = None,
        on_reject: OnReject | None = None,
        max_callers: int = 100_000,
    ) -> None:
        self.rate = (per_minute or 0.0) / 60.0
        self.burst = burst
        self._local = None
        if self.rate > 0:
            share = max(1.0, burst * process_share)
            self._local = _CallerBuckets(self.rate * process_share, share, clock, max_callers)
        self._fleet = fleet
        self._on_reject = on_reject

    @property
    def enabled(self) -> bool:
        """False when no allowance is configured."""
        return self._local is not None

    def charge(self, caller: str) -> Charge | None:
        """What a fetch started by ``caller`` is charged to (None while the quota is off)."""
        if self._local is None:
            return None
        return _CallerCharge(self, caller)

    async def take(self, caller: str) -> bool:
        """Take one call from ``caller``'s allowance: True if from the fleet's bucket.

        Raises ``TooManyRequests`` (nothing taken) when the allowance is spent.
        """
        if self._fleet is not None:
            with contextlib.suppress(SharedCacheUnavailable):  # if so, our own share
                key = self._fleet.key(caller)
                granted, wait = await self._fleet.buckets.take(key, self.rate, self.burst)
                self._refuse_unless(granted, wait, caller, shared=True)
                return True
        if self._local is None:
            raise RuntimeError("the per-caller STS quota is off")  # charge() returned None
        wait = self._local.take(caller)
        self._refuse_unless(wait == 0.0, wait, caller, shared=False)
        return False

    async def give_back(self, caller: str, *, fleet: bool) -> None:
        """Return a call taken but not made (to the bucket it came from)."""
        if fleet and self._fleet is not None:
            key = self._fleet.key(caller)
            with contextlib.suppress(SharedCacheUnavailable):  # the bucket refills by itself
                await self._fleet.buckets.take(key, self.rate, self.burst, cost=-1.0)
        elif self._local is not None:
            self._local.refund(caller)

    def _refuse_unless(self, granted: bool, wait: float, caller: str, *, shared: bool) -> None:
        if granted:
            return
        if self._on_reject is not None:
            self._on_reject()
        raise TooManyRequests(
            "this caller has caused too many STS calls; retry later",
            retry_after=whole_seconds(wait),
            caller=caller,
            quota="caller_sts",
            shared=shared,
        )


class _CallerCharge:
    """One request's ``Charge``: it remembers which bucket paid, to refund the same one."""

    def __init__(self, quota: CallerStsQuota, caller: str) -> None:
        self._quota = quota
        self._caller = caller
        self._fleet = False

    async def take(self) -> None:
        self._fleet = await self._quota.take(self._caller)

    async def give_back(self) -> None:
        await self._quota.give_back(self._caller, fleet=self._fleet)
