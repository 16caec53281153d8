"""Per-caller quotas: separate buckets, 429 with Retry-After, bounded memory; time moved by hand."""

from __future__ import annotations

import pytest

from broker.errors import TooManyRequests
from broker.quotas import CallerQuotas
from tests.conftest import FakeClock

START = 1_000_000.0


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


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
