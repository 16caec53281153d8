"""Building the credential chain from settings: which cache, which budget, what share of it.

STS is the emulator and Redis a real ``redis-server``, both on 127.0.0.1.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from broker.config import Settings
from broker.credentials.chain import CredentialChain, build_chain, connect_shared_cache, sts_budget
from broker.credentials.shared_store import SharedCredentialCache
from broker.credentials.sts import static_credential
from broker.errors import ConfigError, UpstreamThrottled
from broker.metrics import Metrics
from broker.models import AssumeRoleRequest
from broker.policies import load_policies
from broker.services import build_services
from tests.conftest import (
    SOURCE_KEY_ID,
    SOURCE_SECRET,
    FakeClock,
    RedisServer,
    StsHarness,
    make_settings,
)
from tests.credentials.test_sealing import keys_document, new_key

PREFIX = "chain-test:"
REQUEST = AssumeRoleRequest(
    role_arn="acs:ram::1234567890123456:role/oss-service-uploads",
    policy=json.dumps(
        {
            "Version": "1",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["oss:PutObject"],
                    "Resource": ["acs:oss:*:*:examplebucket/services/svc-a/*"],
                }
            ],
        }
    ),
    duration_seconds=3600,
    role_session_name="svc-a",
)


@pytest.fixture
async def make_chain(
    redis_server: RedisServer, sts: StsHarness, clock: FakeClock, tmp_path: Path
) -> AsyncIterator[Callable[..., tuple[CredentialChain, Metrics]]]:
    """Build a chain and its metrics from settings; ``redis=...`` picks the Redis backend."""
    keys = tmp_path / "cache-keys.json"
    keys.write_text(keys_document("k1", k1=new_key()))
    built: list[CredentialChain] = []

    def factory(
        redis: dict[str, Any] | None = None, **sections: Any
    ) -> tuple[CredentialChain, Metrics]:
        if redis is not None:
            options = {
                "url": redis_server.url,
                "key_prefix": PREFIX,
                "encryption_keys_file": str(keys),
            }
            sections["cache"] = {"backend": "redis", "redis": options | redis}
        metrics = Metrics()
        chain = build_chain(
            make_settings(sts.url, **sections),
            metrics,
            credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
            clock=clock,
        )
        built.append(chain)
        return chain, metrics

    yield factory
    for chain in built:
        await chain.cache.close()


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def _scraped(metrics: Metrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


async def test_memory_backend_is_a_plain_cache_in_front_of_sts(
    make_chain: Callable[..., tuple[CredentialChain, Metrics]], sts: StsHarness
) -> None:
    """backend memory: an in-process cache whose misses reach STS, exported as broker_cache_*."""
    chain, metrics = make_chain()
    assert not isinstance(chain.cache, SharedCredentialCache)
    await chain.cache.get(REQUEST)
    await chain.cache.get(REQUEST)
    assert sts.emulator.assume_role_calls() == 1
    assert _scraped(metrics, "broker_cache_hits_total") == 1
    assert _scraped(metrics, "broker_sts_calls_total", outcome="success") == 1
    assert await chain.sts.check_source_credentials()


async def test_redis_backend_shares_the_budget_in_redis(
    make_chain: Callable[..., tuple[CredentialChain, Metrics]], redis_client: Redis
) -> None:
    """backend redis with share_sts_budget: a shared cache, and the budget's bucket in Redis."""
    chain, _ = make_chain(redis={})
    assert isinstance(chain.cache, SharedCredentialCache)
    await chain.cache.get(REQUEST)
    assert await redis_client.exists(f"{PREFIX}sts-budget") == 1


async def test_redis_backend_can_keep_the_budget_local(
    make_chain: Callable[..., tuple[CredentialChain, Metrics]], redis_client: Redis
) -> None:
    """share_sts_budget false: the cache is shared, the budget stays in this process."""
    chain, _ = make_chain(redis={"share_sts_budget": False})
    await chain.cache.get(REQUEST)
    assert await redis_client.exists(f"{PREFIX}sts-budget") == 0
    assert len([key async for key in redis_client.scan_iter(f"{PREFIX}cred:*")]) == 1


def _budget_settings(sts: StsHarness, **sections: Any) -> Settings:
    """4 calls/s, burst 4, no waiting: refusals come at once."""
    limits = {"sts_calls_per_second": 4, "sts_burst": 4, "sts_max_wait_seconds": 0}
    return make_settings(sts.url, quotas=limits, **sections)


async def test_one_of_n_workers_spends_one_nth_of_the_budget(
    sts: StsHarness, clock: FakeClock
) -> None:
    """process_share 1/4 of 4 calls/s with burst 4: one call now, the next refused (and counted)."""
    metrics = Metrics()
    budget = sts_budget(_budget_settings(sts), metrics, clock, process_share=0.25)
    await budget.acquire()
    with pytest.raises(UpstreamThrottled) as caught:
        await budget.acquire()
    assert caught.value.context["budget_per_second"] == 1.0
    assert caught.value.retry_after_seconds == 1
    assert _scraped(metrics, "broker_quota_rejections_total", kind="sts_budget") == 1
    clock.advance(1.0)
    await budget.acquire()


async def test_a_tiny_share_still_allows_one_call(sts: StsHarness, clock: FakeClock) -> None:
    """However many workers share the budget, each may make at least one call at once."""
    budget = sts_budget(_budget_settings(sts), Metrics(), clock, process_share=0.01)
    await budget.acquire()
    with pytest.raises(UpstreamThrottled):
        await budget.acquire()


async def test_shared_budget_is_the_fleet_rate_and_falls_back_to_the_share(
    sts: StsHarness, redis_server: RedisServer, clock: FakeClock, tmp_path: Path
) -> None:
    """With Redis the whole fleet rate is usable; with Redis down, only this worker's share."""
    keys = tmp_path / "cache-keys.json"
    keys.write_text(keys_document("k1", k1=new_key()))
    redis = {"url": redis_server.url, "key_prefix": PREFIX, "encryption_keys_file": str(keys)}
    settings = _budget_settings(sts, cache={"backend": "redis", "redis": redis})
    metrics = Metrics()
    shared = connect_shared_cache(settings, metrics, clock)
    try:
        budget = sts_budget(settings, metrics, clock, shared, process_share=0.5)
        for _ in range(4):
            await budget.acquire()  # the fleet's 4, not this worker's 2
        with pytest.raises(UpstreamThrottled) as caught:
            await budget.acquire()
        assert caught.value.context == {"budget_per_second": 4.0, "shared": True}
        redis_server.stop()
        await budget.acquire()
        await budget.acquire()
        with pytest.raises(UpstreamThrottled) as caught:
            await budget.acquire()
        assert caught.value.context == {"budget_per_second": 2.0}
    finally:
        await shared.close()


def test_unreadable_keys_file_fails_build_services(sts: StsHarness, tmp_path: Path) -> None:
    """A missing keys file stops start-up with a ConfigError naming the file."""
    missing = tmp_path / "nope.json"
    redis = {"url": "redis://127.0.0.1:1/0", "encryption_keys_file": str(missing)}
    settings = make_settings(sts.url, cache={"backend": "redis", "redis": redis})
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read file"):
        build_services(
            settings,
            load_policies(settings.policies_dir),
            credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
        )
