"""Effective lifetimes: the acs:CurrentTime deadline rendered per STS call, the token cut to it."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from broker.config import StsSettings
from broker.credentials.cache import CacheKey, CredentialCache
from broker.credentials.deadline import with_effective_lifetime
from broker.credentials.sts import StsClient, static_credential
from broker.errors import UpstreamError
from broker.models import AssumeRoleRequest
from broker.names import format_sts_time
from tests.conftest import SOURCE_KEY_ID, SOURCE_SECRET, FakeClock, StsHarness

POLICY = (
    '{"Version":"1","Statement":[{"Effect":"Allow","Action":["oss:PutObject"],'
    '"Resource":["acs:oss:*:*:examplebucket/uploads/alice/*"]}]}'
)
SHORT = AssumeRoleRequest(
    role_arn="acs:ram::1234567890123456:role/oss-avatar-upload",
    policy=POLICY,
    duration_seconds=900,
    role_session_name="alice",
    effective_lifetime_seconds=120,
)


def _client(sts: StsHarness, clock: FakeClock) -> StsClient:
    return StsClient(
        StsSettings(endpoint=sts.url, timeout_seconds=2),
        credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
        clock=clock,
    )


def _deadline_sent(sts: StsHarness, index: int = -1) -> str:
    [statement] = json.loads(sts.emulator.calls[index].params["Policy"])["Statement"]
    return str(statement["Condition"]["DateLessThan"]["acs:CurrentTime"])


async def test_the_deadline_is_the_fetch_time_plus_the_lifetime(
    sts: StsHarness, clock: FakeClock
) -> None:
    """STS receives DateLessThan acs:CurrentTime now+120 s; Expiration is that deadline."""
    clock.now = 1_800_000_000.75
    fetch = with_effective_lifetime(_client(sts, clock).assume_role, clock)
    credentials = await fetch(SHORT)
    assert _deadline_sent(sts) == "2027-01-15T08:02:00Z" == format_sts_time(credentials.expiration)
    assert credentials.expires_at == 1_800_000_000 + 120
    [call] = sts.emulator.calls
    assert call.params["DurationSeconds"] == "900"  # STS is still asked for its minimum
    issued = sts.emulator.issued[credentials.access_key_id]
    assert issued.expires_at == 1_800_000_000 + 900  # the STS token itself lives on


async def test_a_request_without_a_lifetime_passes_through(
    sts: StsHarness, clock: FakeClock
) -> None:
    """No effective lifetime: the Policy is sent as is and STS's expiration is kept."""
    fetch = with_effective_lifetime(_client(sts, clock).assume_role, clock)
    credentials = await fetch(replace(SHORT, effective_lifetime_seconds=None))
    assert sts.emulator.calls[0].params["Policy"] == POLICY
    assert credentials.expires_at == int(clock.now) + 900


async def test_sts_is_never_called_with_the_deadline_missing(
    sts: StsHarness, clock: FakeClock
) -> None:
    """The STS client refuses a request whose deadline was not rendered: fail closed."""
    with pytest.raises(UpstreamError, match="deadline"):
        await _client(sts, clock).assume_role(SHORT)
    assert sts.emulator.calls == []


async def test_the_cache_keeps_one_key_and_serves_until_the_margin(
    sts: StsHarness, clock: FakeClock
) -> None:
    """Each fetch has a new deadline, but one cache key; served until 60 s before the deadline."""
    fetch = with_effective_lifetime(_client(sts, clock).assume_role, clock)
    cache = CredentialCache(fetch, clock=clock, refresh_margin_seconds=60, jitter=lambda: 0.0)
    first = await cache.get(SHORT)
    clock.advance(59)
    assert (await cache.get(SHORT)).credentials == first.credentials
    clock.advance(1)  # 60 s left: never served
    second = await cache.get(SHORT)
    assert second.source == "miss"
    assert second.credentials.expires_at == first.credentials.expires_at + 60
    assert _deadline_sent(sts, 0) != _deadline_sent(sts, 1)
    await cache.close()


def test_the_lifetime_is_part_of_the_cache_key() -> None:
    """Two lifetimes (or none) for one Policy are different credentials, so different keys."""
    keys = {
        CacheKey.for_request(replace(SHORT, effective_lifetime_seconds=lifetime))
        for lifetime in (None, 120, 300)
    }
    assert len(keys) == 3
