"""The shared Redis cache: sealed values in Redis, fleet-wide single flight, degradation.

Redis is a real ``redis-server`` started per test on a free port, not a fake.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from broker.cli import main
from broker.config import StsSettings, load_settings
from broker.credentials.redis import SharedRedis
from broker.credentials.sealing import EncryptionKeys
from broker.credentials.shared_store import SharedCredentialCache, SharedCredentialStore
from broker.credentials.sts import StsClient, static_credential
from broker.errors import ConfigError
from broker.metrics import Metrics
from broker.models import AssumeRoleRequest, Credentials
from broker.policies import load_policies
from broker.services import Services, build_services
from tests.conftest import (
    POLICIES_DIR,
    SOURCE_KEY_ID,
    SOURCE_SECRET,
    FakeClock,
    RedisServer,
    StsHarness,
    free_port,
    make_settings,
)
from tests.credentials.test_redis import degraded
from tests.credentials.test_sealing import keys_document, new_key

T = TypeVar("T")

ROLE = "acs:ram::1234567890123456:role/oss-service-uploads"
PREFIX = "test-broker:"


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


def request_for(subject: str = "svc-a", duration: int = 3600) -> AssumeRoleRequest:
    document = {
        "Version": "1",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["oss:PutObject"],
                "Resource": [f"acs:oss:*:*:examplebucket/services/{subject}/*"],
            }
        ],
    }
    return AssumeRoleRequest(
        role_arn=ROLE,
        policy=json.dumps(document, separators=(",", ":")),
        duration_seconds=duration,
        role_session_name=subject,
    )


def sts_fetch(sts: StsHarness, clock: FakeClock) -> Callable[[AssumeRoleRequest], Awaitable[Any]]:
    client = StsClient(
        StsSettings(endpoint=sts.url, timeout_seconds=2),
        credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
        clock=clock,
        min_validity_seconds=60,
    )
    return client.assume_role


@dataclass
class Store:
    """A store straight on Redis (no L1) with its own metrics."""

    store: SharedCredentialStore
    redis: SharedRedis
    metrics: Metrics


@pytest.fixture
async def make_store(
    redis_server: RedisServer, clock: FakeClock
) -> AsyncIterator[Callable[..., Store]]:
    opened: list[SharedRedis] = []

    def factory(keys: EncryptionKeys, **options: Any) -> Store:
        metrics = Metrics()
        redis = SharedRedis(Redis.from_url(redis_server.url), metrics.shared_cache_degraded)
        opened.append(redis)
        store = SharedCredentialStore(
            redis, keys, clock=clock, key_prefix=PREFIX, refresh_margin_seconds=60, **options
        )
        return Store(store, redis, metrics)

    yield factory
    for redis in opened:
        await redis.close()


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    path = tmp_path / "cache-keys.json"
    path.write_text(keys_document("k1", k1=new_key()))
    return path


@pytest.fixture
async def make_replica(
    redis_server: RedisServer, sts: StsHarness, clock: FakeClock, keys_file: Path
) -> AsyncIterator[Callable[..., Services]]:
    """Build a broker's services (a "replica") with ``cache.backend: redis``."""
    built: list[Services] = []

    def factory(**redis_options: Any) -> Services:
        redis = {"url": redis_server.url, "key_prefix": PREFIX}
        redis["encryption_keys_file"] = str(keys_file)
        settings = make_settings(
            sts.url, cache={"backend": "redis", "redis": redis | redis_options}
        )
        services = build_services(
            settings,
            load_policies(settings.policies_dir),
            credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
            clock=clock,
        )
        built.append(services)
        return services

    yield factory
    for services in built:
        await services.cache.close()


def lock_key(services: Services) -> str:
    """The single-flight lock key of ``request_for()`` in this replica's store."""
    assert isinstance(services.cache, SharedCredentialCache)
    return services.cache.shared.store.lock_key(request_for())


def test_backend_redis_without_keys_is_a_config_error(tmp_path: Path) -> None:
    """cache.backend redis with no encryption keys fails at load, naming the key."""
    config = tmp_path / "broker.yaml"
    config.write_text("cache:\n  backend: redis\n  redis: {url: 'redis://127.0.0.1:1/0'}\n")
    with pytest.raises(ConfigError, match="exactly one of encryption_keys_file"):
        load_settings(config)
    config.write_text("cache:\n  backend: redis\n")
    with pytest.raises(ConfigError, match=r"cache: .*backend redis needs a redis section"):
        load_settings(config)


def test_serve_with_a_bad_keys_file_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """sts-broker serve refuses to start (exit 2) when the keys file holds a short key."""
    keys = tmp_path / "cache-keys.json"
    keys.write_text(keys_document("k1", k1="c2hvcnQ="))
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"policies_dir: {POLICIES_DIR}\n"
        "cache:\n  backend: redis\n  redis: {encryption_keys_file: cache-keys.json}\n"
    )
    assert main(["serve", "--config", str(config)]) == 2
    assert f"{keys}: keys.k1: must be 32 bytes" in capsys.readouterr().err


async def test_tampered_or_moved_values_are_misses(
    make_store: Callable[..., Store], redis_client: Redis, sts: StsHarness, clock: FakeClock
) -> None:
    """A flipped ciphertext bit or a value copied to another key is a miss, not an error."""
    keys = EncryptionKeys.parse(keys_document("k1", k1=new_key()), "test")
    shared = make_store(keys)
    fetch = shared.store.wrap(sts_fetch(sts, clock))
    alice, bob = request_for("alice"), request_for("bob")
    await fetch(alice)
    envelope = json.loads(await redis_client.get(shared.store.value_key(alice)))
    ciphertext = bytearray(base64.b64decode(envelope["c"]))
    ciphertext[0] ^= 1
    envelope["c"] = base64.b64encode(bytes(ciphertext)).decode()
    await redis_client.set(shared.store.value_key(alice), json.dumps(envelope), ex=600)
    with capture_logs() as logs:
        other = make_store(keys).store.wrap(sts_fetch(sts, clock))  # another replica
        await other(alice)
        moved = await redis_client.get(shared.store.value_key(alice))
        await redis_client.set(shared.store.value_key(bob), moved, ex=600)
        await other(bob)
    assert sts.emulator.assume_role_calls() == 3
    reasons = [log["reason"] for log in logs if log["event"] == "shared_cache_value_rejected"]
    assert reasons == ["authentication failed", "authentication failed"]


async def test_rotation_reads_old_key_and_seals_with_the_new(
    make_store: Callable[..., Store], redis_client: Redis, sts: StsHarness, clock: FakeClock
) -> None:
    """A value sealed with k1 is read after k2 becomes active; new values carry kid k2."""
    k1, k2 = new_key(), new_key()
    before = make_store(EncryptionKeys.parse(keys_document("k1", k1=k1), "test"))
    first = await before.store.wrap(sts_fetch(sts, clock))(request_for("alice"))
    after = make_store(EncryptionKeys.parse(keys_document("k2", k1=k1, k2=k2), "test"))
    fetch = after.store.wrap(sts_fetch(sts, clock))
    assert await fetch(request_for("alice")) == first
    await fetch(request_for("bob"))
    stored = json.loads(await redis_client.get(after.store.value_key(request_for("bob"))))
    assert stored["kid"] == "k2"
    assert sts.emulator.assume_role_calls() == 2
    without_k1 = make_store(EncryptionKeys.parse(keys_document("k2", k2=k2), "test"))
    await without_k1.store.wrap(sts_fetch(sts, clock))(request_for("alice"))
    assert sts.emulator.assume_role_calls() == 3


async def test_ttl_is_expiration_minus_margin(
    make_store: Callable[..., Store], redis_client: Redis, sts: StsHarness, clock: FakeClock
) -> None:
    """The Redis TTL is expiration - refresh_margin_seconds - now; no lock is left behind."""
    shared = make_store(EncryptionKeys.parse(keys_document("k1", k1=new_key()), "test"))
    credentials = await shared.store.wrap(sts_fetch(sts, clock))(request_for(duration=900))
    ttl_ms = await redis_client.pttl(shared.store.value_key(request_for(duration=900)))
    expected_ms = (credentials.expires_at - 60 - clock()) * 1000
    assert expected_ms - 2000 < ttl_ms <= expected_ms
    assert await redis_client.exists(shared.store.lock_key(request_for(duration=900))) == 0


async def test_credentials_inside_the_margin_are_not_stored(
    make_store: Callable[..., Store], redis_client: Redis, clock: FakeClock
) -> None:
    """Credentials expiring within the refresh margin are handed out but never written."""
    shared = make_store(EncryptionKeys.parse(keys_document("k1", k1=new_key()), "test"))
    expiring = Credentials("STS.x", "s", "t", datetime.fromtimestamp(clock() + 30, UTC))

    async def fetch(request: AssumeRoleRequest) -> Credentials:
        return expiring

    assert await shared.store.wrap(fetch)(request_for()) == expiring
    assert await redis_client.exists(shared.store.value_key(request_for())) == 0


async def test_values_in_redis_hold_no_plaintext_secrets(
    make_replica: Callable[..., Services], redis_client: Redis, sts: StsHarness
) -> None:
    """Nothing in Redis contains an issued AccessKeyId, AccessKeySecret or SecurityToken."""
    services = make_replica()
    for subject in ("alice", "bob", "carol"):
        await services.cache.get(request_for(subject))
    keys = [key async for key in redis_client.scan_iter(f"{PREFIX}*")]
    blob = b"".join([await redis_client.dump(key) for key in keys])
    assert len(keys) == 7  # three values, their callers' sets and the STS budget's bucket
    assert len(sts.emulator.issued) == 3
    for issued in sts.emulator.issued.values():
        for secret in (issued.access_key_id, issued.access_key_secret, issued.security_token):
            assert secret.encode() not in blob
            assert secret.encode()[8:40] not in blob


async def test_two_replicas_make_one_sts_call_for_600_cold_gets(
    make_replica: Callable[..., Services], sts: StsHarness
) -> None:
    """Two replicas, 300 concurrent cold gets each on one scope: exactly 1 AssumeRole."""
    replicas = [make_replica(), make_replica()]
    gets = [replica.cache.get(request_for()) for replica in replicas for _ in range(300)]
    results = await asyncio.gather(*gets)
    assert sts.emulator.assume_role_calls() == 1
    assert len({result.credentials for result in results}) == 1


async def test_a_refresh_reaches_sts_once_for_the_fleet(
    make_replica: Callable[..., Services], sts: StsHarness, clock: FakeClock
) -> None:
    """min_ttl beyond what the replicas hold: one new AssumeRole, both then share it."""
    first, second = make_replica(), make_replica()
    held = (await first.cache.get(request_for())).credentials
    assert (await second.cache.get(request_for())).credentials == held
    clock.advance(100)
    newer = (await first.cache.get(request_for(), min_ttl_seconds=3590)).credentials
    assert newer != held
    assert (await second.cache.get(request_for(), min_ttl_seconds=3590)).credentials == newer
    assert sts.emulator.assume_role_calls() == 2


async def test_dead_lock_holder_is_taken_over_after_the_lock_expires(
    make_replica: Callable[..., Services], redis_client: Redis, sts: StsHarness
) -> None:
    """A lock nobody will release (holder died) delays the replicas until it expires; 1 call."""
    replicas = [make_replica(), make_replica()]
    await redis_client.set(lock_key(replicas[0]), "a-dead-replica", px=400)
    started = time.monotonic()
    gets = [replica.cache.get(request_for()) for replica in replicas for _ in range(20)]
    results = await asyncio.gather(*gets)
    assert time.monotonic() - started >= 0.35
    assert sts.emulator.assume_role_calls() == 1
    assert len({result.credentials for result in results}) == 1


async def test_a_waiter_calls_sts_itself_after_wait_seconds_and_shares_the_result(
    make_replica: Callable[..., Services], redis_client: Redis, sts: StsHarness
) -> None:
    """A lock outliving wait_seconds: the waiter calls STS itself, and publishes what it got.

    One replica waits out the stuck lock; a second replica, asking after it,
    reads that value (the lock is still stuck) instead of calling STS again.
    """
    first, second = make_replica(wait_seconds=0.2), make_replica(wait_seconds=0.2)
    await redis_client.set(lock_key(first), "a-stuck-replica", px=30_000)
    with capture_logs() as logs:
        waited = await first.cache.get(request_for())
    assert sts.emulator.assume_role_calls() == 1
    assert [log["event"] for log in logs].count("shared_cache_wait_expired") == 1
    assert (await second.cache.get(request_for())).credentials == waited.credentials
    assert sts.emulator.assume_role_calls() == 1


class _ObservedRedis(SharedRedis):
    """The real ``SharedRedis``, calling ``before(operation)`` first: a seam to order events."""

    def __init__(self, *args: Any, before: Callable[[str], Awaitable[None]], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._before = before

    async def run(self, operation: str, command: Callable[[Redis], Awaitable[T]]) -> T:
        await self._before(operation)
        return await super().run(operation, command)


_KEYS = EncryptionKeys.parse(keys_document("k1", k1=new_key()), "test")


def _observed_store(
    redis_server: RedisServer, clock: FakeClock, before: Callable[[str], Awaitable[None]], **kw: Any
) -> tuple[SharedCredentialStore, SharedRedis]:
    """A replica's store (no L1) whose Redis calls ``before(operation)`` first."""
    metrics = Metrics()
    client = Redis.from_url(redis_server.url)
    redis = _ObservedRedis(client, metrics.shared_cache_degraded, before=before)
    return SharedCredentialStore(redis, _KEYS, clock=clock, key_prefix=PREFIX, **kw), redis


async def test_a_new_lock_holder_reads_again_before_calling_sts(
    redis_server: RedisServer, sts: StsHarness, clock: FakeClock
) -> None:
    """Read (miss), then the holder publishes and releases, then our lock: the value, no STS."""
    holder_fetch = sts_fetch(sts, clock)
    state: dict[str, Any] = {}

    async def publish_before_our_first_lock(operation: str) -> None:
        if operation == "lock" and "published" not in state:
            state["published"] = await state["holder"].wrap(holder_fetch)(request_for())

    waiter, redis = _observed_store(redis_server, clock, publish_before_our_first_lock)
    holder, holder_redis = _observed_store(redis_server, clock, _nothing)
    state["holder"] = holder
    try:
        got = await waiter.wrap(sts_fetch(sts, clock))(request_for())
    finally:
        await redis.close()
        await holder_redis.close()
    assert got == state["published"]
    assert sts.emulator.assume_role_calls() == 1


async def test_a_slow_holder_keeps_its_lease_and_waiters_wait_for_it(
    redis_server: RedisServer, clock: FakeClock
) -> None:
    """A fetch outlasting lock_ttl: the lease is renewed, the waiter never takes over; 1 fetch."""
    renewals = 0
    renewing, lease_outlived_its_ttl = asyncio.Event(), asyncio.Event()

    async def count_renewals(operation: str) -> None:
        nonlocal renewals
        renewals += operation == "renew"
        if renewals:
            renewing.set()
        if renewals >= 4:  # a renewal every third of lock_ttl: 4/3 of the TTL have passed
            lease_outlived_its_ttl.set()

    fetched: list[Credentials] = []

    async def slow_fetch(request: AssumeRoleRequest) -> Credentials:
        async with asyncio.timeout(30):  # a guard against a hang, not a measurement
            await lease_outlived_its_ttl.wait()
        credentials = Credentials(
            f"STS.{len(fetched)}", "s", "t", datetime.fromtimestamp(clock() + 3600, UTC)
        )
        fetched.append(credentials)
        return credentials

    options = {"lock_ttl_seconds": 3.0, "wait_seconds": 30, "refresh_margin_seconds": 60}
    holder, holder_redis = _observed_store(redis_server, clock, count_renewals, **options)
    waiter, waiter_redis = _observed_store(redis_server, clock, _nothing, **options)
    try:
        first = asyncio.create_task(holder.wrap(slow_fetch)(request_for()))
        async with asyncio.timeout(30):  # a guard against a hang, not a measurement
            await renewing.wait()  # the holder has the lock and is fetching
        second = await waiter.wrap(slow_fetch)(request_for())
        assert await first == second
    finally:
        await holder_redis.close()
        await waiter_redis.close()
    assert len(fetched) == 1


async def _nothing(operation: str) -> None:
    return None


async def test_redis_stopped_mid_run_falls_back_to_sts(
    make_replica: Callable[..., Services], redis_server: RedisServer, sts: StsHarness
) -> None:
    """Redis killed mid-run: every get still succeeds (STS directly) and degraded counts."""
    replicas = [make_replica(), make_replica()]
    await asyncio.gather(*(replica.cache.get(request_for()) for replica in replicas))
    assert sts.emulator.assume_role_calls() == 1
    redis_server.stop()
    with capture_logs() as logs:
        for subject in ("bob", "carol", "dave"):
            gets = [replica.cache.get(request_for(subject)) for replica in replicas]
            await asyncio.gather(*gets)
    assert sts.emulator.assume_role_calls() == 1 + 3 * 2
    assert all(degraded(replica.metrics) >= 3 for replica in replicas)
    events = [log["event"] for log in logs]
    assert events.count("shared_cache_degraded") == 2  # once per replica: rate-limited
    dumped = json.dumps(logs, default=str)
    assert not any(issued.access_key_secret in dumped for issued in sts.emulator.issued.values())


async def test_unreachable_redis_costs_little(
    make_replica: Callable[..., Services], sts: StsHarness
) -> None:
    """Nothing listening at the Redis URL: gets succeed via STS, and Redis is then left alone."""
    replica = make_replica(url=f"redis://127.0.0.1:{free_port()}/0")
    with capture_logs() as logs:
        for subject in ("alice", "bob", "carol"):
            await replica.cache.get(request_for(subject))
    assert sts.emulator.assume_role_calls() == 3
    assert degraded(replica.metrics) >= 3
    # One refused connection; the other operations within the next second skip Redis.
    assert [(log["event"], log["error"]) for log in logs if "error" in log] == [
        ("shared_cache_degraded", "ConnectionError")
    ]


async def test_cold_replica_honours_min_ttl_against_redis(
    make_replica: Callable[..., Services], sts: StsHarness, clock: FakeClock
) -> None:
    """A replica with an empty L1 does not take a Redis value with less than min_ttl left."""
    first, second = make_replica(), make_replica()
    held = (await first.cache.get(request_for())).credentials
    clock.advance(1000)  # 2,600 s left on the shared token
    result = await second.cache.get(request_for(), min_ttl_seconds=3000)
    assert result.credentials != held
    assert result.credentials.expires_at - clock() >= 3000
    assert sts.emulator.assume_role_calls() == 2
