"""The STS call budget: token buckets, a bounded FIFO queue, and the fleet's bucket in Redis.

Time is moved by hand; Redis is a real ``redis-server`` started per test on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from broker.credentials.budget import (
    RedisTokenBuckets,
    SharedBucket,
    StsBudget,
    StsCalls,
    TokenBucket,
    count_sts_calls,
    whole_seconds,
)
from broker.credentials.redis import SharedRedis
from broker.errors import UpstreamThrottled
from broker.metrics import Metrics
from tests.conftest import FakeClock, FakeSleep, RedisServer
from tests.credentials.test_redis import degraded

START = 1_000_000.0
KEY = "test-broker:sts-budget"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
async def metrics_and_redis(
    redis_server: RedisServer,
) -> AsyncIterator[tuple[Metrics, SharedRedis]]:
    metrics = Metrics()
    redis = SharedRedis(Redis.from_url(redis_server.url), metrics.shared_cache_degraded)
    yield metrics, redis
    await redis.close()


@pytest.mark.parametrize(
    ("wait", "seconds"), [(0.0, 1), (0.2, 1), (1.0, 1), (1.0000001, 1), (2.5, 3)]
)
def test_whole_seconds_rounds_up_to_at_least_one(wait: float, seconds: int) -> None:
    """A wait becomes a Retry-After of whole seconds, rounded up (float noise aside), at least 1."""
    assert whole_seconds(wait) == seconds


def test_bucket_allows_burst_then_refuses(clock: FakeClock) -> None:
    """A full bucket grants ``burst`` takes at once, then names the wait for the next token."""
    bucket = TokenBucket(rate=1.0, burst=3.0, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(1.0)


def test_bucket_refills_at_rate(clock: FakeClock) -> None:
    """An empty bucket regains ``rate`` tokens a second; a refused take consumes nothing."""
    bucket = TokenBucket(rate=2.0, burst=1.0, clock=clock)
    assert bucket.take() == 0.0
    clock.advance(0.25)
    assert bucket.take() == pytest.approx(0.25)
    clock.advance(0.25)
    assert bucket.take() == 0.0


def test_bucket_never_holds_more_than_burst(clock: FakeClock) -> None:
    """However long a bucket idles, it holds at most ``burst`` tokens."""
    bucket = TokenBucket(rate=10.0, burst=4.0, clock=clock)
    clock.advance(3600)
    assert bucket.available() == 4.0
    assert [bucket.take() for _ in range(5)][-1] == pytest.approx(0.1)


def test_bucket_ignores_a_clock_stepping_back(clock: FakeClock) -> None:
    """A clock that moves backwards adds no tokens."""
    bucket = TokenBucket(rate=1.0, burst=1.0, clock=clock)
    bucket.take()
    clock.advance(-100)
    assert bucket.available() == 0.0


def test_bucket_rejects_bad_parameters(clock: FakeClock) -> None:
    """A non-positive rate or a cost above the burst is a programming error."""
    with pytest.raises(ValueError, match="positive"):
        TokenBucket(rate=0.0, burst=1.0, clock=clock)
    with pytest.raises(ValueError, match="exceeds"):
        TokenBucket(rate=1.0, burst=1.0, clock=clock).take(2.0)


async def test_budget_within_burst_is_immediate(clock: FakeClock) -> None:
    """Up to ``burst`` acquisitions return at once without sleeping."""
    sleep = FakeSleep(clock)
    budget = StsBudget(rate_per_second=20.0, burst=5.0, clock=clock, sleep=sleep)
    for _ in range(5):
        await budget.acquire()
    assert sleep.delays == []
    assert budget.available() == 0.0


async def test_budget_excess_waits_in_fifo_order(clock: FakeClock) -> None:
    """Acquisitions beyond the burst get successive slots 1/rate apart, served in arrival order."""
    sleep = FakeSleep(clock)
    budget = StsBudget(rate_per_second=10.0, burst=2.0, clock=clock, sleep=sleep)
    served: list[int] = []

    async def caller(index: int) -> None:
        await budget.acquire()
        served.append(index)

    await asyncio.gather(*(caller(index) for index in range(6)))
    assert sleep.delays == pytest.approx([0.1, 0.2, 0.3, 0.4])
    assert served == list(range(6))


async def test_budget_refuses_beyond_max_wait(clock: FakeClock) -> None:
    """A caller that would wait past max_wait_seconds is throttled at once and reserves nothing."""
    sleep = FakeSleep(clock)
    budget = StsBudget(1.0, 1.0, clock, max_wait_seconds=2.0, sleep=sleep)
    waiting = [asyncio.ensure_future(budget.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    with pytest.raises(UpstreamThrottled, match="STS call budget exhausted") as caught:
        await budget.acquire()
    assert caught.value.retry_after_seconds == 3
    assert caught.value.status == 503
    await asyncio.gather(*waiting)
    assert sleep.delays == pytest.approx([1.0, 2.0])
    await budget.acquire()
    assert sleep.delays[-1] == pytest.approx(1.0)


async def test_cancelled_waiter_gives_its_slot_back(clock: FakeClock) -> None:
    """A waiter cancelled while queued frees its slot for the next caller."""
    never = asyncio.Event()
    delays: list[float] = []

    async def blocked_sleep(seconds: float) -> None:
        delays.append(seconds)
        await never.wait()

    budget = StsBudget(1.0, 1.0, clock, sleep=blocked_sleep)
    await budget.acquire()
    waiter = asyncio.ensure_future(budget.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    late = asyncio.ensure_future(budget.acquire())
    await asyncio.sleep(0)
    late.cancel()
    with pytest.raises(asyncio.CancelledError):
        await late
    assert delays == pytest.approx([1.0, 1.0])


async def test_budget_is_shared_across_replicas(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """Two replicas' budgets draw from one Redis bucket; time refills it; rejections are 503s."""
    sleep = FakeSleep(clock)
    connections = [
        SharedRedis(Redis.from_url(redis_server.url), Metrics().shared_cache_degraded)
        for _ in range(2)
    ]

    def budget(redis: SharedRedis, max_wait: float) -> StsBudget:
        fleet = SharedBucket(redis, KEY, 1.0, 2.0, clock)
        return StsBudget(1.0, 2.0, clock, max_wait, sleep, shared=fleet)

    first, second = budget(connections[0], 0.0), budget(connections[1], 1.5)
    try:
        await first.acquire()
        await first.acquire()
        with pytest.raises(UpstreamThrottled) as caught:
            await first.acquire()
        assert caught.value.retry_after_seconds == 1
        assert caught.value.retryable is False
        assert caught.value.context == {"budget_per_second": 1.0, "shared": True}
        await second.acquire()  # queues for the next token instead
        assert sleep.delays == [1.0]
        clock.advance(2.0)
        await first.acquire()
    finally:
        for redis in connections:
            await redis.close()


async def test_budget_falls_back_to_the_local_bucket(
    metrics_and_redis: tuple[Metrics, SharedRedis], redis_server: RedisServer, clock: FakeClock
) -> None:
    """With Redis gone, acquire uses this process's own bucket and counts the bypass."""
    metrics, redis = metrics_and_redis
    budget = StsBudget(1.0, 2.0, clock, 0.0, shared=SharedBucket(redis, KEY, 1.0, 2.0, clock))
    await budget.acquire()
    redis_server.stop()
    await budget.acquire()  # the local bucket is still full
    await budget.acquire()
    with pytest.raises(UpstreamThrottled) as caught:
        await budget.acquire()
    assert caught.value.context == {"budget_per_second": 1.0}
    assert degraded(metrics) == 3


async def test_fallback_bucket_is_only_this_process_share(
    metrics_and_redis: tuple[Metrics, SharedRedis], redis_server: RedisServer, clock: FakeClock
) -> None:
    """One of N workers falls back to 1/N of the budget while Redis is down, not all of it."""
    _, redis = metrics_and_redis
    fleet = SharedBucket(redis, KEY, 4.0, 4.0, clock)
    budget = StsBudget(1.0, 1.0, clock, 0.0, shared=fleet)
    redis_server.stop()
    await budget.acquire()
    with pytest.raises(UpstreamThrottled):
        await budget.acquire()  # the fleet allows 4, this worker's share is 1


async def test_cancelled_waiter_gives_its_slot_back_to_the_fleet(
    metrics_and_redis: tuple[Metrics, SharedRedis], clock: FakeClock
) -> None:
    """A waiter cancelled while queued on the fleet's bucket returns its slot to Redis."""
    _, redis = metrics_and_redis
    never, sleeping = asyncio.Event(), asyncio.Event()
    delays: list[float] = []

    async def blocked_sleep(seconds: float) -> None:
        delays.append(seconds)
        sleeping.set()
        await never.wait()

    fleet = SharedBucket(redis, KEY, 1.0, 1.0, clock)
    budget = StsBudget(1.0, 1.0, clock, 5.0, blocked_sleep, shared=fleet)
    await budget.acquire()
    for _ in range(2):
        sleeping.clear()
        waiter = asyncio.ensure_future(budget.acquire())
        await sleeping.wait()
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
    assert delays == pytest.approx([1.0, 1.0])  # the second waiter got the first one's slot
    assert budget.available() == 1.0  # the local bucket was never touched


async def test_redis_buckets_are_one_per_key_and_refunds_stop_at_burst(
    metrics_and_redis: tuple[Metrics, SharedRedis], clock: FakeClock
) -> None:
    """Each key is its own bucket; a negative cost gives tokens back, never beyond the burst."""
    _, redis = metrics_and_redis
    buckets = RedisTokenBuckets(redis, clock)
    assert await buckets.take("k:a", 1.0, 2.0) == (True, 0.0)
    assert await buckets.take("k:a", 1.0, 2.0) == (True, 0.0)
    assert await buckets.take("k:a", 1.0, 2.0) == (False, 1.0)
    assert await buckets.take("k:b", 1.0, 2.0) == (True, 0.0)
    for _ in range(5):
        await buckets.take("k:b", 1.0, 2.0, cost=-1.0)
    assert [(await buckets.take("k:b", 1.0, 2.0))[0] for _ in range(3)] == [True, True, False]


async def test_granted_slots_are_counted_in_the_fetch_that_took_them(clock: FakeClock) -> None:
    """Slots are counted in the counter of the task that took them; refusals and others are not."""
    budget = StsBudget(1.0, 2.0, clock, max_wait_seconds=0.0)

    async def fetch(attempts: int) -> StsCalls:
        calls = count_sts_calls()
        for _ in range(attempts):
            with contextlib.suppress(UpstreamThrottled):
                await budget.acquire()
        return calls

    await budget.acquire()  # outside any fetch: counted nowhere
    first = await asyncio.ensure_future(fetch(1))
    second = await asyncio.ensure_future(fetch(2))
    assert (first.count, second.count) == (1, 0)
