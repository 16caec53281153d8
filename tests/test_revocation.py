"""Revocation across replicas on one real Redis: refused, purged from L1 and Redis; others kept."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from broker.auth import Revocations, revoked_session_names
from broker.credentials.shared_store import SharedCredentialCache
from broker.revocation import listen_for_revocations, purge, revoke
from broker.services import Services
from tests.conftest import RedisServer
from tests.credentials import test_shared_store as shared_store_tests
from tests.credentials.test_shared_store import PREFIX, request_for

keys_file = shared_store_tests.keys_file  # fixtures: replicas on one real redis-server
make_replica = shared_store_tests.make_replica


@pytest.fixture
async def redis_client(redis_server: RedisServer) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_server.url)
    yield client
    await client.aclose()


async def _redis_keys(redis_client: Redis, pattern: str) -> list[bytes]:
    return [key async for key in redis_client.scan_iter(f"{PREFIX}{pattern}")]


async def _listening(replica: Services, applied: asyncio.Queue[Revocations]) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(
        listen_for_revocations(replica, ready=ready, applied=applied.put_nowait)
    )
    await ready.wait()
    return task


async def test_store_purge_deletes_only_the_callers_values(
    make_replica: Callable[..., Services], redis_client: Redis
) -> None:
    """The caller's values and its index leave Redis; another caller's stay."""
    replica = make_replica()
    await replica.cache.get(request_for("svc-a"))
    await replica.cache.get(request_for("svc-a", duration=1800))
    await replica.cache.get(request_for("svc-b"))
    assert isinstance(replica.cache, SharedCredentialCache)
    store = replica.cache.shared.store
    assert len(await store.held(frozenset({"svc-a"}))) == 2
    assert await store.purge(frozenset({"svc-a"})) == 2
    assert await store.held(frozenset({"svc-a"})) == []
    assert await _redis_keys(redis_client, "caller:svc-a") == []
    assert len(await store.held(frozenset({"svc-b"}))) == 1
    assert len(await _redis_keys(redis_client, "cred:*")) == 1


async def test_revoke_on_one_replica_reaches_the_others(
    make_replica: Callable[..., Services], redis_client: Redis
) -> None:
    """Revoked on one replica: refused and purged on every replica and in Redis; svc-b untouched."""
    first, second, third = make_replica(), make_replica(), make_replica()
    for replica in (first, second, third):
        await replica.cache.get(request_for("svc-a"))
        await replica.cache.get(request_for("svc-b"))
    applied: asyncio.Queue[Revocations] = asyncio.Queue()
    listeners = [await _listening(replica, applied) for replica in (second, third)]
    revoked = Revocations(callers=frozenset({"svc-a"}))
    report = await revoke(first, revoked)
    assert (report.memory, report.redis) == (1, 1)
    async with asyncio.timeout(30):  # a bound, not an ordering: each message sets the queue
        assert [await applied.get() for _ in listeners] == [revoked] * len(listeners)
    for listener in listeners:
        listener.cancel()
    names = revoked_session_names(revoked)
    for replica in (first, second, third):
        assert replica.cache.entries(names) == []
        assert replica.authenticator.revoked.callers == {"svc-a"}
        assert len(replica.cache.entries(frozenset({"svc-b"}))) == 1
    assert await _redis_keys(redis_client, "caller:svc-a") == []
    assert len(await _redis_keys(redis_client, "cred:*")) == 1


async def test_a_reload_purge_does_not_make_other_replicas_refuse(
    make_replica: Callable[..., Services],
) -> None:
    """A reload's purge drops L1 entries everywhere; refusing is left to each one's reload."""
    first, second = make_replica(), make_replica()
    await second.cache.get(request_for("svc-a"))
    applied: asyncio.Queue[Revocations] = asyncio.Queue()
    listener = await _listening(second, applied)
    await purge(first, Revocations(callers=frozenset({"svc-a"})))
    async with asyncio.timeout(30):  # a bound: the listener puts the message in the queue
        await applied.get()
    listener.cancel()
    assert second.cache.entries(frozenset({"svc-a"})) == []
    assert second.authenticator.revoked == Revocations()
