"""The guarded Redis connection: bounded commands, fallback signal, counted and quiet degradation.

Redis is a real ``redis-server`` started per test on a free port, not a fake.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from structlog.testing import capture_logs

from broker.config import RedisSettings
from broker.credentials.redis import SharedCacheUnavailable, SharedRedis, connect_redis
from broker.errors import ConfigError
from broker.metrics import Metrics
from tests.conftest import FakeClock, RedisServer, free_port


def degraded(metrics: Metrics, operation: str | None = None) -> float:
    """Counts of ``broker_shared_cache_degraded_total``: one operation's, or all of them."""
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "broker_shared_cache_degraded"
        for sample in family.samples
        if sample.name.endswith("_total")
        and (operation is None or sample.labels["operation"] == operation)
    )


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


@pytest.fixture
def monotonic() -> FakeClock:
    return FakeClock(1000.0)


@pytest.fixture
async def redis(
    redis_server: RedisServer, metrics: Metrics, monotonic: FakeClock
) -> AsyncIterator[SharedRedis]:
    client = Redis.from_url(redis_server.url)
    # A generous timeout: these tests pin what failures do, and a loaded machine can take
    # longer than the 0.25 s default to answer a healthy command (the timeout has its own test).
    shared = SharedRedis(
        client, metrics.shared_cache_degraded, operation_timeout_seconds=10.0, monotonic=monotonic
    )
    yield shared
    await shared.close()


async def test_a_command_runs_and_returns_its_result(redis: SharedRedis, metrics: Metrics) -> None:
    """A healthy Redis answers through ``run``; nothing is counted as degraded."""
    assert await redis.run("write", lambda client: client.set("k", "v"))
    assert await redis.run("read", lambda client: client.get("k")) == b"v"
    assert degraded(metrics) == 0


async def test_a_failure_is_signalled_counted_and_then_left_alone(
    redis: SharedRedis, metrics: Metrics, monotonic: FakeClock
) -> None:
    """A failed command raises SharedCacheUnavailable; for a second Redis is not even tried."""
    with capture_logs() as logs:
        with pytest.raises(SharedCacheUnavailable):
            await redis.run("read", lambda client: client.execute_command("NO-SUCH-COMMAND"))
        with pytest.raises(SharedCacheUnavailable):
            await redis.run("write", lambda client: client.set("k", "v"))
        monotonic.advance(1.0)
        assert await redis.run("read", lambda client: client.get("k")) is None  # not written
    assert (degraded(metrics, "read"), degraded(metrics, "write")) == (1, 1)
    events = [(log["event"], log.get("error")) for log in logs]
    assert events == [("shared_cache_degraded", "ResponseError"), ("shared_cache_recovered", None)]


async def test_degradation_is_logged_at_most_every_30_seconds(
    redis: SharedRedis, metrics: Metrics, monotonic: FakeClock
) -> None:
    """Every failure is counted, but shared_cache_degraded is logged once per 30 s."""

    def failing(client: Redis) -> object:
        return client.execute_command("NO-SUCH-COMMAND")

    with capture_logs() as logs:
        for _ in range(10):
            with pytest.raises(SharedCacheUnavailable):
                await redis.run("read", failing)
            monotonic.advance(2.0)
        monotonic.advance(30.0)
        with pytest.raises(SharedCacheUnavailable):
            await redis.run("read", failing)
    assert degraded(metrics) == 11
    assert [log["event"] for log in logs].count("shared_cache_degraded") == 2


async def test_a_slow_command_times_out_as_unavailable(
    redis_server: RedisServer, metrics: Metrics
) -> None:
    """A command outliving operation_timeout_seconds is abandoned as SharedCacheUnavailable."""
    client = Redis.from_url(redis_server.url)
    redis = SharedRedis(client, metrics.shared_cache_degraded, operation_timeout_seconds=0.05)
    try:
        with pytest.raises(SharedCacheUnavailable) as caught:
            await redis.run("lock", lambda client: client.blpop(["never-filled"], timeout=5))
    finally:
        await redis.close()
    assert isinstance(caught.value.__cause__, TimeoutError)
    assert degraded(metrics, "lock") == 1


async def test_a_busy_loop_does_not_turn_a_prompt_redis_into_a_timeout(
    redis_server: RedisServer, metrics: Metrics
) -> None:
    """The loop hogged past the deadline while a cold client connects: the command still succeeds.

    (With a plain ``asyncio.timeout`` the deadline fires before the handshake's
    next step runs, and a healthy Redis counts as down.)
    """
    client = Redis.from_url(redis_server.url)  # cold: connect, handshake, then GET
    redis = SharedRedis(client, metrics.shared_cache_degraded, operation_timeout_seconds=0.5)
    loop = asyncio.get_running_loop()

    async def get_behind_a_busy_loop(client: Redis) -> object:
        loop.call_soon(time.sleep, 1.0)  # another callback holds the loop past the deadline
        return await client.get("k")

    try:
        assert await redis.run("read", get_behind_a_busy_loop) is None
    finally:
        await redis.close()
    assert degraded(metrics) == 0


async def test_a_server_that_never_answers_times_out(metrics: Metrics) -> None:
    """A peer that accepts and stays silent costs operation_timeout_seconds, not a hang."""
    accepted: list[asyncio.StreamWriter] = []
    silent = await asyncio.start_server(lambda _, writer: accepted.append(writer), "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = RedisSettings.model_validate(
        {
            "url": f"redis://127.0.0.1:{port}/0",
            "encryption_keys_env": "KEYS",
            "operation_timeout_seconds": 0.1,
        }
    )
    redis = connect_redis(settings, metrics.shared_cache_degraded, {})
    try:
        with pytest.raises(SharedCacheUnavailable) as caught:
            await redis.run("read", lambda client: client.get("k"))
    finally:
        await redis.close()
        for writer in accepted:
            writer.close()
            await writer.wait_closed()
        silent.close()
        await silent.wait_closed()
    assert isinstance(caught.value.__cause__, TimeoutError)


async def test_nothing_listening_is_unavailable(metrics: Metrics) -> None:
    """A Redis URL with nothing behind it fails the command, not the caller."""
    settings = RedisSettings.model_validate(
        {"url": f"redis://127.0.0.1:{free_port()}/0", "encryption_keys_env": "KEYS"}
    )
    redis = connect_redis(settings, metrics.shared_cache_degraded, {})
    try:
        with pytest.raises(SharedCacheUnavailable):
            await redis.run("read", lambda client: client.get("k"))
    finally:
        await redis.close()
    assert degraded(metrics, "read") == 1


def test_a_missing_password_variable_is_a_config_error(metrics: Metrics) -> None:
    """password_env naming an unset variable stops start-up, naming the variable."""
    settings = RedisSettings.model_validate(
        {"password_env": "REDIS_PASSWORD", "encryption_keys_env": "KEYS"}
    )
    with pytest.raises(ConfigError, match="REDIS_PASSWORD is not set"):
        connect_redis(settings, metrics.shared_cache_degraded, {})
