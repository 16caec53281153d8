"""Per-caller protection end to end, default quotas: STS calls caused count, requests do not.

Real HTTP to a broker on 127.0.0.1, the STS emulator as a real server, a real
``redis-server`` for the fleet; time moves by hand.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from broker.config import QuotaSettings
from tests.conftest import POLICIES_DIR, BrokerFactory, BrokerHarness, RedisServer
from tests.credentials.test_sealing import keys_document, new_key

DEFAULTS = QuotaSettings().model_dump()  # overrides every quota the test helpers loosen
SCOPES = 11  # one more than the default caller_sts_burst (10)


@pytest.fixture
def policies_dir(tmp_path: Path) -> Path:
    """The shipped policies plus ``files-00`` .. ``files-10``, each a scope of its own for svc-a."""
    folder = tmp_path / "policies"
    folder.mkdir()
    for source in POLICIES_DIR.glob("*.yaml"):
        (folder / source.name).write_text(source.read_text())
    template = (POLICIES_DIR / "service-uploads.yaml").read_text()
    for index in range(SCOPES):
        text = template.replace("name: service-uploads", f"name: files-{index:02d}")
        text = text.replace('prefix: "services/', f'prefix: "files-{index:02d}/')
        (folder / f"files-{index:02d}.yaml").write_text(text)
    return folder


async def _credentials(
    broker: BrokerHarness, policy: str, caller: str = "svc-a", **query: str
) -> tuple[int, dict[str, str], Any]:
    path = f"/v1/credentials/{policy}"
    async with broker.client.get(path, headers=broker.auth(caller), params=query) as reply:
        return reply.status, dict(reply.headers), await reply.json()


async def _rejections(broker: BrokerHarness) -> dict[str, float]:
    """``broker_quota_rejections_total`` as scraped from /metrics: every kind, with its count."""
    async with broker.client.get("/metrics") as reply:
        text = await reply.text()
    counts = {}
    for line in text.splitlines():
        if line.startswith("broker_quota_rejections_total{"):
            labels, value = line.split(" ")
            counts[labels.split('"')[1]] = float(value)
    return counts


def _refused(**kinds: float) -> dict[str, float]:
    return {"caller_requests": 0.0, "caller_sts": 0.0, "sts_budget": 0.0, **kinds}


async def test_300_concurrent_requests_for_cached_credentials_are_all_served(
    make_broker: BrokerFactory,
) -> None:
    """300 concurrent requests by one caller for one scope: all 200, from one STS call."""
    broker = await make_broker(quotas=DEFAULTS)
    replies = await asyncio.gather(
        *(broker.get_json("/v1/credentials/service-uploads") for _ in range(300))
    )
    assert [status for status, _ in replies] == [200] * 300
    assert len({body["AccessKeyId"] for _, body in replies}) == 1
    assert broker.sts.emulator.assume_role_calls() == 1
    assert await _rejections(broker) == _refused()


async def test_1000_presigns_in_a_row_are_all_served(make_broker: BrokerFactory) -> None:
    """A batch of 1,000 presigns by one caller over 500 s: all 200, two STS calls in all."""
    broker = await make_broker(quotas=DEFAULTS)
    body = {"policy": "avatar-upload", "key": "avatars/alice/a.png", "content_type": "image/png"}
    body |= {"content_length": 1024}  # avatar-upload limits object sizes
    statuses = []
    for _ in range(1000):
        async with broker.client.post("/v1/presign", json=body, headers=broker.auth("alice")) as r:
            statuses.append(r.status)
        broker.clock.advance(0.5)
    assert statuses == [200] * 1000
    # The first presign, then one refresh once the token had less than the 600 s a URL may live.
    assert broker.sts.emulator.assume_role_calls() == 2
    assert await _rejections(broker) == _refused()


async def test_a_caller_over_its_sts_share_is_refused_and_others_are_served(
    make_broker: BrokerFactory, policies_dir: Path
) -> None:
    """The 11th new scope at once is 429 for that caller; its cached scopes and others are 200."""
    broker = await make_broker(policies_dir, quotas=DEFAULTS)
    for index in range(SCOPES - 1):
        assert (await _credentials(broker, f"files-{index:02d}"))[0] == 200
    status, headers, body = await _credentials(broker, "files-10")
    assert status == 429
    assert headers["Retry-After"] == "1"
    assert body["error"]["code"] == "TooManyRequests"
    assert "STS calls" in body["error"]["message"]
    assert (await _credentials(broker, "files-10", caller="svc-reports"))[0] == 200
    for index in range(SCOPES - 1):  # hits cost no STS call, so they are never refused
        assert (await _credentials(broker, f"files-{index:02d}"))[0] == 200
    assert broker.sts.emulator.assume_role_calls() == SCOPES
    assert await _rejections(broker) == _refused(caller_sts=1)
    broker.clock.advance(0.25)  # 240 a minute: one more call every 0.25 s
    assert (await _credentials(broker, "files-10"))[0] == 200


async def test_min_ttl_refreshes_count_as_sts_calls_caused(
    make_broker: BrokerFactory, policies_dir: Path
) -> None:
    """Forced refreshes spend the share: past it, min_ttl gets 429 and a presign a clamped URL."""
    broker = await make_broker(policies_dir, quotas=DEFAULTS)
    for index in range(SCOPES):
        assert (await _credentials(broker, f"files-{index:02d}"))[0] == 200
        broker.clock.advance(0.25)
    broker.clock.advance(61)  # every token now has less than 3540 s left; the share is full
    calls = broker.sts.emulator.assume_role_calls()
    for index in range(SCOPES - 1):
        status, _, _ = await _credentials(broker, f"files-{index:02d}", min_ttl_seconds="3540")
        assert status == 200
    status, _, _ = await _credentials(broker, "files-10", min_ttl_seconds="3540")
    assert status == 429
    presign = {"policy": "files-10", "key": "files-10/svc-a/f.bin", "expires_seconds": 3540}
    presign |= {"content_length": 1}  # the size is signed: these policies limit it
    async with broker.client.post("/v1/presign", json=presign, headers=broker.auth("svc-a")) as r:
        assert r.status == 200
        signed = await r.json()
    assert signed["clamped"] is True  # signed by the cached token, for what it has left
    assert (await _credentials(broker, "files-10", caller="svc-reports"))[0] == 200
    assert broker.sts.emulator.assume_role_calls() == calls + SCOPES
    assert await _rejections(broker) == _refused(caller_sts=2)


async def test_the_request_rate_quota_is_still_available(make_broker: BrokerFactory) -> None:
    """Configured, the request-rate quota refuses past its burst and is counted by its kind."""
    broker = await make_broker(
        quotas={**DEFAULTS, "caller_requests_per_second": 1, "caller_burst": 2}
    )
    statuses = [(await broker.get_json("/v1/policies"))[0] for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert await _rejections(broker) == _refused(caller_requests=1)


async def test_the_fleet_shares_each_callers_sts_allowance_in_redis(
    make_broker: BrokerFactory, policies_dir: Path, redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two brokers on one Redis: one allowance per caller; what Redis holds is served free."""
    keys = tmp_path / "cache-keys.json"
    keys.write_text(keys_document("k1", k1=new_key()))
    redis = {"url": redis_server.url, "key_prefix": "quota-http:", "encryption_keys_file": keys}
    cache = {"backend": "redis", "redis": redis}
    first, second = [await make_broker(policies_dir, quotas=DEFAULTS, cache=cache) for _ in "ab"]
    for index in range(6):
        assert (await _credentials(first, f"files-{index:02d}"))[0] == 200
    for index in range(6, SCOPES - 1):
        assert (await _credentials(second, f"files-{index:02d}"))[0] == 200
    for broker in (first, second):
        assert (await _credentials(broker, "files-10"))[0] == 429
    for index in range(6):  # cached in Redis by the first broker: no STS call, no charge
        assert (await _credentials(second, f"files-{index:02d}"))[0] == 200
    assert (await _credentials(second, "files-10", caller="svc-reports"))[0] == 200
    assert first.sts.emulator.assume_role_calls() == SCOPES
    redis_server.stop()  # each broker falls back to its own bucket: the full share here
    assert (await _credentials(second, "files-10"))[0] == 200
