"""Per-caller quotas: the STS calls a caller causes, the optional request rate; time moved by hand.

Redis is a real ``redis-server`` started per test on a free port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from broker.config import QuotaSettings
from broker.credentials.budget import RedisTokenBuckets
from broker.credentials.redis import SharedRedis
from broker.errors import TooManyRequests
from broker.metrics import Metrics
from broker.policies import PolicySet
from broker.quotas import CallerQuotas, CallerStsQuota, FleetBuckets
from broker.services import build_services
from tests.conftest import FakeClock, RedisServer, StsHarness, make_settings

START = 1_000_000.0
PREFIX = "quota-test:"


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


def test_try_take_counts_what_check_would_and_reports_nothing(clock: FakeClock) -> None:
    """``try_take`` takes a token while there is one; past that False, with no rejection counted."""
    rejected: list[None] = []
    quotas = CallerQuotas(1.0, 2.0, clock, on_reject=lambda: rejected.append(None))
    assert quotas.try_take("alice")
    assert quotas.try_take("alice")
    assert not quotas.try_take("alice")
    assert rejected == []
    with pytest.raises(TooManyRequests):  # the general path's check then refuses, and reports
        quotas.check("alice")
    assert len(rejected) == 1
    assert CallerQuotas(None, None, clock).try_take("alice")  # no quota: always


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


@pytest.mark.parametrize("rate", [None, 0])
def test_request_quota_is_off_without_a_rate(clock: FakeClock, rate: float | None) -> None:
    """With no request rate (the default) no number of requests is refused, and nothing is kept."""
    quotas = CallerQuotas(rate, None, clock)
    assert not quotas.enabled
    for _ in range(10_000):
        quotas.check("alice")
    assert len(quotas) == 0


def test_request_burst_defaults_to_one_seconds_worth(clock: FakeClock) -> None:
    """A request rate without a burst allows one second's worth of requests at once."""
    quotas = CallerQuotas(3.0, None, clock)
    for _ in range(3):
        quotas.check("alice")
    with pytest.raises(TooManyRequests):
        quotas.check("alice")


def test_request_refusals_are_reported(clock: FakeClock) -> None:
    """Each refused request calls ``on_reject`` once (the metric's hook); served ones do not."""
    refused: list[None] = []
    quotas = CallerQuotas(1.0, 1.0, clock, on_reject=lambda: refused.append(None))
    quotas.check("alice")
    assert refused == []
    for _ in range(2):
        with pytest.raises(TooManyRequests):
            quotas.check("alice")
    assert len(refused) == 2


# The STS calls a caller causes


async def _take_all(quota: CallerStsQuota, caller: str, count: int) -> None:
    charge = quota.charge(caller)
    assert charge is not None
    for _ in range(count):
        await charge.take()


@pytest.mark.parametrize("per_minute", [None, 0])
def test_sts_quota_is_off_without_an_allowance(clock: FakeClock, per_minute: float | None) -> None:
    """With no allowance configured, a fetch is charged to nobody."""
    quota = CallerStsQuota(per_minute, 10.0, clock)
    assert not quota.enabled
    assert quota.charge("alice") is None


async def test_sts_allowance_is_per_caller_and_refuses_with_retry_after(clock: FakeClock) -> None:
    """Past its burst a caller's fetch is refused with 429 and the wait; another caller is not."""
    refused: list[None] = []
    quota = CallerStsQuota(30.0, 2.0, clock, on_reject=lambda: refused.append(None))
    await _take_all(quota, "alice", 2)
    charge = quota.charge("alice")
    assert charge is not None
    with pytest.raises(TooManyRequests) as caught:
        await charge.take()
    assert caught.value.status == 429
    assert caught.value.retry_after_seconds == 2  # 30 a minute: one every 2 s
    assert caught.value.context == {"caller": "alice", "quota": "caller_sts", "shared": False}
    assert "STS calls" in caught.value.message
    assert refused == [None]
    await _take_all(quota, "bob", 2)
    clock.advance(2.0)
    await charge.take()


async def test_a_given_back_call_can_be_spent_again(clock: FakeClock) -> None:
    """A call given back (the fetch made no STS call) returns to the caller's allowance."""
    quota = CallerStsQuota(60.0, 1.0, clock)
    charge = quota.charge("alice")
    assert charge is not None
    await charge.take()
    await charge.give_back()
    await charge.take()
    with pytest.raises(TooManyRequests):
        await charge.take()


async def test_one_of_n_workers_holds_one_nth_of_each_allowance(clock: FakeClock) -> None:
    """process_share 1/4 of 240 a minute with burst 10: 2.5 at once and one a second."""
    quota = CallerStsQuota(240.0, 10.0, clock, process_share=0.25)
    await _take_all(quota, "alice", 2)
    with pytest.raises(TooManyRequests):
        await _take_all(quota, "alice", 1)
    clock.advance(0.5)  # 0.5 left + 0.5 refilled
    await _take_all(quota, "alice", 1)


async def test_a_tiny_share_still_allows_one_call(clock: FakeClock) -> None:
    """However many workers there are, each lets a caller start at least one fetch at once."""
    quota = CallerStsQuota(240.0, 10.0, clock, process_share=0.01)
    await _take_all(quota, "alice", 1)
    with pytest.raises(TooManyRequests):
        await _take_all(quota, "alice", 1)


def test_default_settings_build_the_documented_quotas(sts: StsHarness, clock: FakeClock) -> None:
    """By default: no request rate; 240 STS calls a minute per caller, 10 at once."""
    settings = make_settings(sts.url, quotas=QuotaSettings().model_dump())
    services = build_services(settings, PolicySet(), clock=clock)
    assert not services.quotas.enabled
    assert services.sts_quota.enabled
    assert (services.sts_quota.rate, services.sts_quota.burst) == (4.0, 10.0)


# The fleet's allowance in Redis


@pytest.fixture
async def connections(redis_server: RedisServer) -> AsyncIterator[list[SharedRedis]]:
    """Two replicas' Redis connections."""
    made = [
        SharedRedis(Redis.from_url(redis_server.url), Metrics().shared_cache_degraded)
        for _ in range(2)
    ]
    yield made
    for redis in made:
        await redis.close()


def _fleet_quota(
    redis: SharedRedis, clock: FakeClock, process_share: float = 1.0
) -> CallerStsQuota:
    fleet = FleetBuckets(RedisTokenBuckets(redis, clock), PREFIX)
    return CallerStsQuota(60.0, 3.0, clock, process_share=process_share, fleet=fleet)


async def test_allowance_is_shared_by_the_fleet(
    connections: list[SharedRedis], clock: FakeClock
) -> None:
    """Two replicas draw one caller's allowance from one Redis bucket; other callers are apart."""
    first, second = (_fleet_quota(redis, clock) for redis in connections)
    await _take_all(first, "alice", 2)
    await _take_all(second, "alice", 1)
    for quota in (first, second):
        with pytest.raises(TooManyRequests) as caught:
            await _take_all(quota, "alice", 1)
        assert caught.value.context["shared"] is True
    await _take_all(second, "bob", 3)
    clock.advance(1.0)
    await _take_all(first, "alice", 1)


async def test_a_call_given_back_returns_to_the_fleet(
    connections: list[SharedRedis], clock: FakeClock
) -> None:
    """A call paid in Redis and given back can be spent by another replica."""
    first, second = (_fleet_quota(redis, clock) for redis in connections)
    await _take_all(first, "alice", 2)
    charge = first.charge("alice")
    assert charge is not None
    await charge.take()
    await charge.give_back()
    await _take_all(second, "alice", 1)
    with pytest.raises(TooManyRequests):
        await _take_all(second, "alice", 1)


async def test_redis_keys_never_hold_the_caller_id(
    connections: list[SharedRedis], redis_server: RedisServer, clock: FakeClock
) -> None:
    """A caller's bucket is a Redis key named by the digest of its id, under the key prefix."""
    await _take_all(_fleet_quota(connections[0], clock), "jwt:alice@example.com", 1)
    client = Redis.from_url(redis_server.url)
    try:
        keys = [key.decode() for key in await client.keys("*")]
    finally:
        await client.aclose()
    assert len(keys) == 1
    assert keys[0].startswith(f"{PREFIX}caller-sts:")
    assert "alice" not in keys[0]


async def test_without_redis_each_replica_falls_back_to_its_share(
    connections: list[SharedRedis], redis_server: RedisServer, clock: FakeClock
) -> None:
    """Redis down: a worker's fetches are charged to its own 1/N share; a refund goes there too."""
    quota = _fleet_quota(connections[0], clock, process_share=0.5)  # 1.5 at once locally
    await _take_all(quota, "alice", 3)  # the fleet's 3
    redis_server.stop()
    charge = quota.charge("alice")
    assert charge is not None
    await charge.take()
    await charge.give_back()
    await charge.take()
    with pytest.raises(TooManyRequests) as caught:
        await charge.take()
    assert caught.value.context["shared"] is False
