"""The credential cache against the STS emulator (a real server), with time moved by hand.

The purge of expired entries is scheduled through an injected ``call_later``
(``Timers``), so a test moves the clock and runs the wake-up the cache asked for.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import StsSettings
from broker.credentials.budget import StsBudget
from broker.credentials.cache import CacheKey, CredentialCache
from broker.credentials.sts import StsClient, static_credential
from broker.errors import TooManyRequests, UpstreamError, UpstreamThrottled
from broker.models import AssumeRoleRequest, Credentials
from tests.conftest import SOURCE_KEY_ID, SOURCE_SECRET, FakeClock, StsHarness

ROLE = "acs:ram::1234567890123456:role/oss-avatar-upload"


def _request(subject: str = "alice", duration: int = 900) -> AssumeRoleRequest:
    document = {
        "Version": "1",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["oss:PutObject"],
                "Resource": [f"acs:oss:*:*:examplebucket/avatars/{subject}/*"],
            }
        ],
    }
    return AssumeRoleRequest(
        role_arn=ROLE,
        policy=json.dumps(document, separators=(",", ":")),
        duration_seconds=duration,
        role_session_name=subject,
    )


def _client(sts: StsHarness, clock: FakeClock) -> StsClient:
    return StsClient(
        StsSettings(endpoint=sts.url, timeout_seconds=2),
        credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
        clock=clock,
        min_validity_seconds=60,
    )


def _cache(sts: StsHarness, clock: FakeClock, **kwargs: object) -> CredentialCache:
    options: dict[str, object] = {"clock": clock, "jitter": lambda: 0.0, **kwargs}
    return CredentialCache(_client(sts, clock).assume_role, **options)  # type: ignore[arg-type]


@dataclass
class _Timer:
    at: float
    callback: Callable[[], None]
    cancelled: bool = False

    def cancel(self) -> None:
        self.cancelled = True


class Timers:
    """An injected ``call_later``: records each wake-up at clock time; the test runs them."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.timers: list[_Timer] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> _Timer:
        timer = _Timer(self.clock() + delay, callback)
        self.timers.append(timer)
        return timer

    def next_at(self) -> float | None:
        """When the next live wake-up is due, if any."""
        return min((timer.at for timer in self.timers if not timer.cancelled), default=None)

    def run_due(self) -> None:
        """Run every live wake-up whose time has come, as the loop would."""
        due = [timer for timer in self.timers if not timer.cancelled and timer.at <= self.clock()]
        for timer in due:
            self.timers.remove(timer)
            timer.callback()


async def test_concurrent_misses_share_one_sts_call(sts: StsHarness, clock: FakeClock) -> None:
    """1,000 concurrent cold gets for one key make exactly one AssumeRole."""
    cache = _cache(sts, clock)
    results = await asyncio.gather(*(cache.get(_request()) for _ in range(1000)))
    assert sts.emulator.assume_role_calls() == 1
    assert len({result.credentials.access_key_id for result in results}) == 1
    assert sum(result.source == "miss" for result in results) == 1000


async def test_distinct_keys_get_distinct_calls(sts: StsHarness, clock: FakeClock) -> None:
    """50 distinct subjects, 10 concurrent gets each, make exactly 50 AssumeRole calls."""
    cache = _cache(sts, clock)
    requests = [_request(f"user{index}") for index in range(50)] * 10
    await asyncio.gather(*(cache.get(request) for request in requests))
    assert sts.emulator.assume_role_calls() == 50
    assert len(cache) == 50


async def test_no_call_before_half_life_one_refresh_after(
    sts: StsHarness, clock: FakeClock
) -> None:
    """With 900 s tokens: no STS call while more than half is left, one refresh after."""
    cache = _cache(sts, clock)
    first = (await cache.get(_request())).credentials
    for _ in range(449):
        clock.advance(1)
        assert (await cache.get(_request())).credentials == first
    assert sts.emulator.assume_role_calls() == 1
    clock.advance(2)  # 451 s in: less than half of the lifetime left
    served = await asyncio.gather(*(cache.get(_request()) for _ in range(20)))
    assert {result.credentials for result in served} == {first}  # callers keep the current one
    await cache.join()
    assert sts.emulator.assume_role_calls() == 2
    assert cache.stats.background_refreshes == 1
    refreshed = (await cache.get(_request())).credentials
    assert refreshed != first
    assert refreshed.expires_at == clock() + 900


async def test_jittered_refresh_lands_between_half_and_forty_percent(
    sts: StsHarness, clock: FakeClock
) -> None:
    """With full jitter the refresh starts between 450 s and 540 s into a 900 s token."""
    cache = _cache(sts, clock, jitter=lambda: 0.999)
    await cache.get(_request())
    clock.advance(450)
    await cache.get(_request())
    await cache.join()
    assert sts.emulator.assume_role_calls() == 1
    clock.advance(91)
    await cache.get(_request())
    await cache.join()
    assert sts.emulator.assume_role_calls() == 2


async def test_never_served_inside_the_margin(sts: StsHarness, clock: FakeClock) -> None:
    """A token is served up to expiry minus 60 s, and never within the last 60 s."""
    cache = _cache(sts, clock, refresh_fraction=0.1)
    first = (await cache.get(_request())).credentials
    sts.emulator.faults.error_status = 500  # refreshes fail: only the margin rule is left
    clock.advance(900 - 60 - 1)
    assert (await cache.get(_request())).credentials == first
    await cache.join()
    clock.advance(1)  # exactly at expiry - margin
    with pytest.raises(UpstreamError):
        await cache.get(_request())
    sts.emulator.faults.clear()
    fresh = (await cache.get(_request())).credentials
    assert fresh != first
    assert fresh.expires_at - clock() > 60


async def test_errors_are_not_cached(sts: StsHarness, clock: FakeClock) -> None:
    """A failed fetch is raised to every waiter and the next get calls STS again."""
    cache = _cache(sts, clock)
    sts.emulator.faults.error_status = 500
    sts.emulator.faults.remaining = 1
    outcomes = await asyncio.gather(
        *(cache.get(_request()) for _ in range(10)), return_exceptions=True
    )
    assert all(isinstance(outcome, UpstreamError) for outcome in outcomes)
    assert len(cache) == 0
    result = await cache.get(_request())
    assert result.source == "miss"
    assert len(sts.emulator.calls) == 2


async def test_min_ttl_forces_a_fresh_token(sts: StsHarness, clock: FakeClock) -> None:
    """A request wanting more validity than the cached token has gets a fresh token."""
    cache = _cache(sts, clock)
    first = (await cache.get(_request())).credentials
    clock.advance(300)  # 600 s left
    assert (await cache.get(_request(), min_ttl_seconds=600)).credentials == first
    result = await cache.get(_request(), min_ttl_seconds=601)
    assert result.source == "refresh"
    assert result.credentials != first
    assert (await cache.get(_request(), min_ttl_seconds=800)).credentials == result.credentials
    assert sts.emulator.assume_role_calls() == 2


async def test_failed_background_refresh_keeps_serving(sts: StsHarness, clock: FakeClock) -> None:
    """A failing refresh leaves the valid entry in service and is retried after a pause."""
    cache = _cache(sts, clock)
    first = (await cache.get(_request())).credentials
    clock.advance(500)
    sts.emulator.faults.throttle = True
    assert (await cache.get(_request())).credentials == first
    await cache.join()
    assert cache.stats.refresh_failures == 1
    for _ in range(5):  # within the pause: no new attempts
        assert (await cache.get(_request())).credentials == first
    await cache.join()
    assert len(sts.emulator.calls) == 2
    sts.emulator.faults.clear()
    clock.advance(11)
    assert (await cache.get(_request())).credentials == first
    await cache.join()
    assert (await cache.get(_request())).credentials != first


async def test_bounded_by_max_entries(sts: StsHarness, clock: FakeClock) -> None:
    """Beyond max_entries the least recently used entry is evicted."""
    cache = _cache(sts, clock, max_entries=3)
    for name in ("u1", "u2", "u3"):
        await cache.get(_request(name))
    await cache.get(_request("u1"))  # u1 is now the most recently used
    await cache.get(_request("u4"))
    assert len(cache) == 3
    assert cache.stats.evictions == 1
    assert (await cache.get(_request("u1"))).source == "hit"
    assert (await cache.get(_request("u2"))).source == "miss"


async def test_caller_cancellation_does_not_cancel_shared_call(
    sts: StsHarness, clock: FakeClock
) -> None:
    """A waiter that goes away does not cancel the AssumeRole the others share."""
    client = _client(sts, clock)
    started, release = asyncio.Event(), asyncio.Event()

    async def held_fetch(request: AssumeRoleRequest) -> Credentials:
        started.set()
        await release.wait()
        return await client.assume_role(request)

    cache = CredentialCache(held_fetch, clock=clock, jitter=lambda: 0.0)
    impatient = asyncio.ensure_future(cache.get(_request()))
    patient = asyncio.ensure_future(cache.get(_request()))
    await started.wait()  # both callers are waiting on the one shared fetch
    impatient.cancel()
    with pytest.raises(asyncio.CancelledError):
        await impatient
    release.set()
    result = await patient
    assert result.source == "miss"
    assert sts.emulator.assume_role_calls() == 1
    assert len(cache) == 1


async def test_expired_entries_leave_memory_without_a_request(
    sts: StsHarness, clock: FakeClock
) -> None:
    """Past expiry - margin, the scheduled purge drops the entry nobody asked for again."""
    timers = Timers(clock)
    cache = _cache(sts, clock, call_later=timers)
    await cache.get(_request())
    assert timers.next_at() == clock() + 900 - 60  # the end of the serving window
    clock.advance(900 - 60)
    assert len(cache) == 1  # a TLRUCache alone would keep it until the next access
    timers.run_due()
    assert len(cache) == 0
    assert timers.next_at() is None
    assert sts.emulator.assume_role_calls() == 1


async def test_purge_wakes_for_the_earliest_serving_window(
    sts: StsHarness, clock: FakeClock
) -> None:
    """A shorter-lived entry brings the wake-up forward; each purge waits for the next one."""
    timers = Timers(clock)
    cache = _cache(sts, clock, call_later=timers)
    start = clock()
    await cache.get(_request("long", duration=3600))
    assert timers.next_at() == start + 3600 - 60
    await cache.get(_request("short", duration=900))
    assert timers.next_at() == start + 900 - 60
    clock.advance(900 - 60)
    timers.run_due()
    assert len(cache) == 1
    assert (await cache.get(_request("long", duration=3600))).source == "hit"
    assert timers.next_at() == start + 3600 - 60
    clock.advance(3600 - 900)
    timers.run_due()
    assert len(cache) == 0


async def test_a_refreshed_entry_outlives_the_old_wake_up(
    sts: StsHarness, clock: FakeClock
) -> None:
    """The purge at the old entry's end keeps the refreshed entry, then waits for its end."""
    timers = Timers(clock)
    cache = _cache(sts, clock, call_later=timers)
    await cache.get(_request())
    clock.advance(451)  # past half-life: the next get refreshes in the background
    await cache.get(_request())
    await cache.join()
    refreshed_until = clock() + 900 - 60
    clock.advance(900 - 60 - 451)
    timers.run_due()
    assert len(cache) == 1
    assert timers.next_at() == refreshed_until
    assert (await cache.get(_request())).source == "hit"


async def test_close_cancels_the_scheduled_purge(sts: StsHarness, clock: FakeClock) -> None:
    """A closed cache leaves no wake-up behind."""
    timers = Timers(clock)
    cache = _cache(sts, clock, call_later=timers)
    await cache.get(_request())
    await cache.close()
    assert timers.next_at() is None


def test_key_follows_every_field_that_shapes_credentials() -> None:
    """Changing role, policy, duration, external id or session name changes the key."""
    base = _request()
    variants = [
        AssumeRoleRequest(ROLE + "x", base.policy, 900, "alice"),
        AssumeRoleRequest(ROLE, base.policy + " ", 900, "alice"),
        AssumeRoleRequest(ROLE, base.policy, 901, "alice"),
        AssumeRoleRequest(ROLE, base.policy, 900, "alice", external_id="ext-1"),
        AssumeRoleRequest(ROLE, base.policy, 900, "alice2"),
    ]
    keys = {CacheKey.for_request(request) for request in [base, *variants]}
    assert len(keys) == 6
    assert CacheKey.for_request(base) == CacheKey.for_request(_request())


def test_empty_policy_is_unrepresentable() -> None:
    """An AssumeRoleRequest cannot be built without an inline policy."""
    with pytest.raises(ValueError, match="inline policy"):
        AssumeRoleRequest(ROLE, "", 900, "alice")


async def test_min_ttl_as_preference_falls_back_when_sts_fails(
    sts: StsHarness, clock: FakeClock
) -> None:
    """A preferred min_ttl that STS cannot meet returns the still-valid entry as stale."""
    cache = _cache(sts, clock)
    first = (await cache.get(_request())).credentials
    clock.advance(300)
    sts.emulator.faults.error_status = 500
    result = await cache.get(_request(), min_ttl_seconds=700, min_ttl_is_preference=True)
    assert (result.source, result.credentials) == ("stale", first)
    with pytest.raises(UpstreamError):
        await cache.get(_request(), min_ttl_seconds=700)


async def test_stale_fallback_never_crosses_the_margin(sts: StsHarness, clock: FakeClock) -> None:
    """If the failed refresh took the entry past expiry - margin, the error is raised instead."""
    client = _client(sts, clock)

    async def slow_fetch(request: AssumeRoleRequest) -> Credentials:
        clock.advance(30)  # STS took 30 s to fail
        return await client.assume_role(request)

    cache = CredentialCache(slow_fetch, clock=clock, jitter=lambda: 0.0)
    await cache.get(_request())  # issued at t=30, serve_until t=870
    clock.advance(820)  # t=850: 20 s before the margin
    sts.emulator.faults.error_status = 500
    with pytest.raises(UpstreamError):
        await cache.get(_request(), min_ttl_seconds=800, min_ttl_is_preference=True)


_assume_requests = st.builds(
    AssumeRoleRequest,
    role_arn=st.sampled_from(["acs:ram::1:role/a", "acs:ram::1:role/b"]),
    policy=st.sampled_from(['{"Version":"1"}', '{"Version":"1" }']) | st.text(min_size=1),
    duration_seconds=st.sampled_from([900, 3600]),
    role_session_name=st.sampled_from(["alice", "bob"]),
    external_id=st.sampled_from([None, "x", ""]),
)


@settings(max_examples=200, deadline=None, database=None)
@given(first=_assume_requests, second=_assume_requests)
def test_cache_keys_are_equal_iff_all_five_fields_are(
    first: AssumeRoleRequest, second: AssumeRoleRequest
) -> None:
    """CacheKey.for_request: equal (and equally hashed) exactly when every field is equal."""
    fields = ("role_arn", "policy", "duration_seconds", "external_id", "role_session_name")
    same = all(getattr(first, name) == getattr(second, name) for name in fields)
    key_a, key_b = CacheKey.for_request(first), CacheKey.for_request(second)
    assert (key_a == key_b) == same
    if same:
        assert hash(key_a) == hash(key_b)


# Who pays for a fetch (the ``charge`` hook of the per-caller STS quota)


class Tab:
    """A ``Charge`` that records what it is asked; it may hold ``take`` until let go, or refuse."""

    def __init__(self, *, refuse: bool = False, held: asyncio.Event | None = None) -> None:
        self.refuse = refuse
        self.held = held
        self.taken = 0
        self.given_back = 0

    async def take(self) -> None:
        if self.held is not None:
            await self.held.wait()
        if self.refuse:
            raise TooManyRequests("over its share")
        self.taken += 1

    async def give_back(self) -> None:
        self.given_back += 1


def _budgeted_cache(
    sts: StsHarness, clock: FakeClock, burst: float = 100.0, **kwargs: object
) -> CredentialCache:
    """A cache whose fetch takes an STS budget slot first, as in the real chain."""
    client, budget = _client(sts, clock), StsBudget(100.0, burst, clock, max_wait_seconds=0.0)

    async def fetch(request: AssumeRoleRequest) -> Credentials:
        await budget.acquire()
        return await client.assume_role(request)

    options: dict[str, object] = {"clock": clock, "jitter": lambda: 0.0, **kwargs}
    return CredentialCache(fetch, **options)  # type: ignore[arg-type]


async def test_only_the_request_that_starts_a_fetch_pays(sts: StsHarness, clock: FakeClock) -> None:
    """50 concurrent misses: one pays, the joiners and the later hits pay nothing."""
    cache = _budgeted_cache(sts, clock)
    tabs = [Tab() for _ in range(60)]
    await asyncio.gather(*(cache.get(_request(), charge=tab) for tab in tabs[:50]))
    for tab in tabs[50:]:
        assert (await cache.get(_request(), charge=tab)).source == "hit"
    assert sum(tab.taken for tab in tabs) == 1
    assert sum(tab.given_back for tab in tabs) == 0
    assert sts.emulator.assume_role_calls() == 1


async def test_requests_wait_for_the_one_paying_then_join(
    sts: StsHarness, clock: FakeClock
) -> None:
    """While one request pays (Redis is slow), others for the key wait, then join its fetch."""
    held = asyncio.Event()
    cache = _budgeted_cache(sts, clock)
    tabs = [Tab(held=held) for _ in range(20)]
    gets = [asyncio.ensure_future(cache.get(_request(), charge=tab)) for tab in tabs]
    await asyncio.sleep(0)
    held.set()
    results = await asyncio.gather(*gets)
    assert len({result.credentials for result in results}) == 1
    assert sum(tab.taken for tab in tabs) == 1
    assert sts.emulator.assume_role_calls() == 1


async def test_a_refused_charge_refuses_only_its_own_request(
    sts: StsHarness, clock: FakeClock
) -> None:
    """The payer is refused: it gets 429, and a request waiting behind it pays and is served."""
    held = asyncio.Event()
    cache = _budgeted_cache(sts, clock)
    over, under = Tab(refuse=True, held=held), Tab()
    first = asyncio.ensure_future(cache.get(_request(), charge=over))
    await asyncio.sleep(0)
    second = asyncio.ensure_future(cache.get(_request(), charge=under))
    await asyncio.sleep(0)
    held.set()
    with pytest.raises(TooManyRequests):
        await first
    assert (await second).source == "miss"
    assert (over.taken, under.taken) == (0, 1)
    assert sts.emulator.assume_role_calls() == 1


async def test_a_min_ttl_refresh_is_paid_for(sts: StsHarness, clock: FakeClock) -> None:
    """A refresh forced by min_ttl is charged; refused, it is 429, or stale if min_ttl is a wish."""
    cache = _budgeted_cache(sts, clock)
    first = (await cache.get(_request())).credentials
    clock.advance(300)
    with pytest.raises(TooManyRequests):
        await cache.get(_request(), min_ttl_seconds=700, charge=Tab(refuse=True))
    wish = await cache.get(
        _request(), min_ttl_seconds=700, min_ttl_is_preference=True, charge=Tab(refuse=True)
    )
    assert (wish.source, wish.credentials) == ("stale", first)
    tab = Tab()
    assert (await cache.get(_request(), min_ttl_seconds=700, charge=tab)).source == "refresh"
    assert (tab.taken, tab.given_back) == (1, 0)
    assert sts.emulator.assume_role_calls() == 2


async def test_background_refreshes_are_charged_to_nobody(
    sts: StsHarness, clock: FakeClock
) -> None:
    """The hit that starts a background refresh pays nothing for it."""
    cache = _budgeted_cache(sts, clock)
    await cache.get(_request())
    clock.advance(500)  # past half its life
    tab = Tab()
    assert (await cache.get(_request(), charge=tab)).source == "hit"
    await cache.join()
    assert sts.emulator.assume_role_calls() == 2
    assert (tab.taken, tab.given_back) == (0, 0)


async def test_a_fetch_that_made_no_sts_call_is_given_back(
    sts: StsHarness, clock: FakeClock
) -> None:
    """A fetch the budget refused, or made without it, is refunded; one that called STS is not."""
    cache = _budgeted_cache(sts, clock, burst=1.0)
    paid, refused = Tab(), Tab()
    await cache.get(_request("alice"), charge=paid)
    with pytest.raises(UpstreamThrottled):
        await cache.get(_request("bob"), charge=refused)
    assert (paid.taken, paid.given_back) == (1, 0)
    assert (refused.taken, refused.given_back) == (1, 1)
    unbudgeted, tab = _cache(sts, clock), Tab()
    await unbudgeted.get(_request("carol"), charge=tab)
    assert (tab.taken, tab.given_back) == (1, 1)


async def test_purge_drops_only_the_named_callers_entries(
    sts: StsHarness, clock: FakeClock
) -> None:
    """purge(names) removes every entry of those session names, no other; next get is a miss."""
    cache = _cache(sts, clock)
    await cache.get(_request("alice"))
    await cache.get(_request("alice", duration=1800))
    kept = (await cache.get(_request("bob"))).credentials
    assert {entry.key.role_session_name for entry in cache.entries(frozenset({"alice"}))} == {
        "alice"
    }
    assert cache.purge(frozenset({"alice"})) == 2
    assert cache.entries(frozenset({"alice"})) == []
    assert len(cache) == 1
    assert (await cache.get(_request("bob"))).credentials == kept
    assert (await cache.get(_request("alice"))).source == "miss"


async def test_fetch_in_flight_when_purged_is_not_stored(sts: StsHarness, clock: FakeClock) -> None:
    """A fetch of a purged caller that lands after the purge is returned once but never cached."""
    started, release = asyncio.Event(), asyncio.Event()
    fetch = _client(sts, clock).assume_role

    async def held_fetch(request: AssumeRoleRequest) -> Credentials:
        started.set()
        await release.wait()
        return await fetch(request)

    cache = CredentialCache(held_fetch, clock=clock, jitter=lambda: 0.0)
    pending = asyncio.create_task(cache.get(_request("alice")))
    await started.wait()
    assert cache.purge(frozenset({"alice"})) == 0
    release.set()
    await pending
    assert len(cache) == 0
    assert (await cache.get(_request("alice"))).source == "miss"
    assert len(cache) == 1


async def test_servable_is_fresh_without_counting_a_hit(sts: StsHarness, clock: FakeClock) -> None:
    """``servable`` answers as ``fresh`` does (the same token, or None) and counts nothing."""
    cache = _cache(sts, clock)
    key = CacheKey.for_request(_request())
    assert cache.servable(key, 0, clock()) is None
    first = (await cache.get(_request())).credentials
    assert cache.servable(key, 0, clock()) is first
    assert cache.servable(key, 901, clock()) is None
    clock.advance(451)
    assert cache.servable(key, 0, clock()) is None
    assert (cache.stats.hits, cache.stats.misses) == (0, 1)


async def test_fresh_serves_only_hits_that_need_nothing_done(
    sts: StsHarness, clock: FakeClock
) -> None:
    """``fresh`` is a hit only while the entry is not due for refresh and has min_ttl left."""
    cache = _cache(sts, clock)
    key = CacheKey.for_request(_request())
    assert cache.fresh(key, 0, clock()) is None  # a miss: get must fetch
    first = (await cache.get(_request())).credentials
    hit = cache.fresh(key, 0, clock())
    assert hit is not None
    assert (hit.credentials, hit.source) == (first, "hit")
    assert cache.fresh(key, 901, clock()) is None  # more than it has left: get refreshes
    clock.advance(451)  # due for its background refresh: get starts it
    assert cache.fresh(key, 0, clock()) is None
    assert cache.stats.hits == 1
    assert sts.emulator.assume_role_calls() == 1
