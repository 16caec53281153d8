"""Per-caller request quotas: one caller cannot use up everyone's share (429 + Retry-After).

Each caller has a token bucket on the injected clock, so tests move time by
hand.  The STS call budget, the other rate limit, is part of the credential
chain: ``broker.credentials.budget``.
"""

from __future__ import annotations

from collections import OrderedDict

from broker.credentials.budget import TokenBucket, whole_seconds
from broker.errors import TooManyRequests
from broker.models import Clock

__all__ = ["CallerQuotas"]


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
            raise TooManyRequests(retry_after=whole_seconds(wait), caller=caller)

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
