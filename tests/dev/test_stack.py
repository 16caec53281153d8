"""dev_stack: the emulators wired to the broker; short-lived tokens with --token-lifetime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient

from broker.dev.stack import DevStack, check_token_lifetime, dev_stack
from broker.policies import load_policies
from tests.conftest import POLICIES_DIR, FakeClock, start_test_server

POLICY = "service-uploads"  # duration_seconds: 3600, callable by the dev key (group internal)


@dataclass
class ShortLived:
    dev: DevStack
    client: TestClient[Any, Any]
    clock: FakeClock

    async def credentials(self) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {self.dev.dev_key}"}
        async with self.client.get(f"/v1/credentials/{POLICY}", headers=headers) as response:
            assert response.status == 200, await response.text()
            body: dict[str, Any] = await response.json()
            return body


async def _short_lived(
    tmp_path: Path, clock: FakeClock, aiohttp_client: Any, seconds: int
) -> AsyncIterator[ShortLived]:
    policies = load_policies(POLICIES_DIR)
    async with dev_stack(
        policies,
        POLICIES_DIR,
        tmp_path / "oss",
        port=0,
        clock=clock,
        token_lifetime_seconds=seconds,
    ) as dev:
        client = await aiohttp_client(await start_test_server(dev.services))
        yield ShortLived(dev, client, clock)


@pytest.fixture
async def stack120(
    tmp_path: Path, clock: FakeClock, aiohttp_client: Any
) -> AsyncIterator[ShortLived]:
    async for stack in _short_lived(tmp_path, clock, aiohttp_client, 120):
        yield stack


@pytest.fixture
async def stack300(
    tmp_path: Path, clock: FakeClock, aiohttp_client: Any
) -> AsyncIterator[ShortLived]:
    async for stack in _short_lived(tmp_path, clock, aiohttp_client, 300):
        yield stack


def _expires_at(body: dict[str, Any]) -> float:
    return (
        datetime.strptime(body["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()
    )


async def test_tokens_live_the_issued_lifetime_while_the_policy_duration_is_requested(
    stack120: ShortLived,
) -> None:
    """--token-lifetime 120: Expiration is now + 120 s; AssumeRole still asked for 3600 s."""
    start = stack120.clock.now
    body = await stack120.credentials()
    assert _expires_at(body) == start + 120
    assert body["ExpiresIn"] == 120
    calls = stack120.dev.sts.calls
    assert [call.params["DurationSeconds"] for call in calls] == ["3600"]


async def test_a_120_second_token_is_served_until_60_seconds_before_expiry(
    stack120: ShortLived,
) -> None:
    """The 60 s cache margin holds: same token at +59 s, a new one from +60 s, STS called twice."""
    first = await stack120.credentials()
    stack120.clock.advance(59)
    again = await stack120.credentials()
    stack120.clock.advance(1)
    renewed = await stack120.credentials()
    assert again["AccessKeyId"] == first["AccessKeyId"]
    assert renewed["AccessKeyId"] != first["AccessKeyId"]
    assert _expires_at(renewed) == stack120.clock.now + 120
    assert stack120.dev.sts.assume_role_calls() == 2


async def test_refresh_ahead_still_renews_short_tokens_in_the_background(
    stack300: ShortLived,
) -> None:
    """300 s tokens: past half-life (plus jitter) a hit starts one background refresh."""
    first = await stack300.credentials()
    stack300.clock.advance(181)  # past the latest refresh point (300 - 0.4 * 300 = 180 s)
    hit = await stack300.credentials()
    await stack300.dev.services.cache.join()
    refreshed = await stack300.credentials()
    assert hit["AccessKeyId"] == first["AccessKeyId"]
    assert refreshed["AccessKeyId"] != first["AccessKeyId"]
    assert stack300.dev.sts.assume_role_calls() == 2


async def test_the_stack_remembers_its_token_lifetime(stack120: ShortLived) -> None:
    """DevStack.token_lifetime_seconds is what the banner shows."""
    assert stack120.dev.token_lifetime_seconds == 120


@pytest.mark.parametrize("seconds", [0, 60, 43201])
def test_a_lifetime_the_cache_could_never_serve_is_refused(seconds: int) -> None:
    """At most the 60 s margin (never servable) or over STS's 43200 s maximum: ValueError."""
    with pytest.raises(ValueError, match="--token-lifetime must be more than"):
        check_token_lifetime(seconds, 60)


def test_lifetimes_just_inside_the_bounds_are_accepted() -> None:
    """61 and 43200 seconds are accepted with the default 60 s margin."""
    check_token_lifetime(61, 60)
    check_token_lifetime(43200, 60)


async def test_presigned_urls_are_clamped_to_a_short_token(stack120: ShortLived) -> None:
    """A 600 s presign with 120 s tokens is clamped to the token; each such presign refetches."""
    headers = {"Authorization": f"Bearer {stack120.dev.dev_key}"}
    body = {"policy": POLICY, "key": "services/dev/a.bin", "expires_seconds": 600}
    body["content_length"] = 1  # service-uploads limits object sizes
    replies = []
    for _ in range(2):
        async with stack120.client.post("/v1/presign", json=body, headers=headers) as response:
            assert response.status == 200, await response.text()
            replies.append(await response.json())
    assert [(r["clamped"], r["expires_in"]) for r in replies] == [(True, 120), (True, 120)]
    assert stack120.dev.sts.assume_role_calls() == 2


def test_a_lifetime_longer_than_the_shortest_policy_is_refused() -> None:
    """Longer than the shortest policy's duration_seconds: refused (STS never gives more)."""
    with pytest.raises(ValueError, match="at most 900"):
        check_token_lifetime(901, 60, 900)
    check_token_lifetime(900, 60, 900)
