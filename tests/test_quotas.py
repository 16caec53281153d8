"""Token buckets, per-caller quotas and the STS call budget, with time moved by hand."""

from __future__ import annotations

import asyncio

import pytest

from broker.errors import TooManyRequests, UpstreamThrottled
from broker.quotas import CallerQuotas, StsBudget, TokenBucket
from tests.conftest import FakeClock, FakeSleep

START = 1_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


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


def test_callers_have_separate_quotas(clock: FakeClock) -> None:
    """One caller exhausting its quota does not touch another's."""
    quotas = CallerQuotas(rate_per_second=1.0, burst=2.0, clock=clock)
    quotas.check("alice")
    quotas.check("alice")
    with pytest.raises(TooManyRequests):
        quotas.check("alice")
    quotas.check("bob")
    quotas.check("bob")


@pytest.mark.parametrize(("rate", "retry_after"), [(0.25, 4), (2.0, 1), (0.3, 4)])
def test_refusal_carries_retry_after_rounded_up(
    clock: FakeClock, rate: float, retry_after: int
) -> None:
    """An over-quota caller gets 429 TooManyRequests with the wait in whole seconds, rounded up."""
    quotas = CallerQuotas(rate_per_second=rate, burst=1.0, clock=clock)
    quotas.check("alice")
    with pytest.raises(TooManyRequests) as caught:
        quotas.check("alice")
    assert caught.value.status == 429
    assert caught.value.code == "TooManyRequests"
    assert caught.value.retry_after_seconds == retry_after


def test_quota_recovers_after_retry_after(clock: FakeClock) -> None:
    """A refused caller that waits Retry-After seconds is served again."""
    quotas = CallerQuotas(rate_per_second=0.5, burst=1.0, clock=clock)
    quotas.check("alice")
    with pytest.raises(TooManyRequests) as caught:
        quotas.check("alice")
    clock.advance(caught.value.retry_after)
    quotas.check("alice")


def test_caller_count_is_bounded(clock: FakeClock) -> None:
    """However many distinct callers arrive, at most ``max_callers`` buckets are kept."""
    quotas = CallerQuotas(rate_per_second=1.0, burst=5.0, clock=clock, max_callers=3)
    for index in range(50):
        quotas.check(f"caller-{index}")
        assert len(quotas) <= 3


def test_idle_callers_are_dropped(clock: FakeClock) -> None:
    """A caller whose bucket has refilled completely is forgotten on the next check."""
    quotas = CallerQuotas(rate_per_second=1.0, burst=2.0, clock=clock)
    for index in range(10):
        quotas.check(f"caller-{index}")
    clock.advance(2.0)
    quotas.check("late")
    assert len(quotas) == 1


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
