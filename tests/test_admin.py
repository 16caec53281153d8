"""The admin channel: a 0600 unix socket per process; `cached` and `revoke` on real brokers."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from broker.admin import socket_path
from broker.admin_cli import ask_all
from broker.auth import hash_api_key
from broker.dev.emulators.sts import StsEmulator
from tests.conftest import POLICIES_DIR, BrokerFactory, BrokerHarness, RedisServer
from tests.credentials.test_shared_store import keys_document, new_key
from tests.test_fleet import (
    ACCESS_KEY_ID,
    ACCESS_KEY_SECRET,
    STS_BROKER,
    Broker,
    _config,
    _free_port,
    _get,
)
from tests.test_fleet import emulator as emulator


@pytest.fixture
async def admin_broker(make_broker: BrokerFactory, tmp_path: Path) -> BrokerHarness:
    return await make_broker(admin={"socket_dir": str(tmp_path / "admin")})


async def _ask(socket_dir: Path, request: dict[str, Any]) -> list[dict[str, Any]]:
    return [reply for _, reply in await asyncio.to_thread(ask_all, socket_dir, request)]


async def test_socket_is_0600_in_a_0700_directory(
    admin_broker: BrokerHarness, tmp_path: Path
) -> None:
    """Only the broker's user can reach the admin socket: directory 0700, socket 0600."""
    socket_dir = tmp_path / "admin"
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(socket_path(socket_dir).stat().st_mode) == 0o600


async def test_cached_shows_entries_without_secrets(
    admin_broker: BrokerHarness, tmp_path: Path
) -> None:
    """`cached` lists the caller's entry (AccessKeyId, digest, expiry), never secret or token."""
    status, issued = await admin_broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200
    [reply] = await _ask(tmp_path / "admin", {"op": "cached", "callers": ["alice"]})
    assert reply["ok"] is True
    [entry] = reply["entries"]
    assert (entry["source"], entry["access_key_id"]) == ("memory", issued["AccessKeyId"])
    text = json.dumps(reply)
    assert issued["AccessKeySecret"] not in text
    assert issued["SecurityToken"] not in text


async def test_revoke_refuses_and_purges_only_that_caller(
    admin_broker: BrokerHarness, tmp_path: Path
) -> None:
    """`revoke` on a running broker: the next request is 401, entries gone, svc-a served."""
    assert (await admin_broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 200
    assert (await admin_broker.get_json("/v1/credentials/service-uploads", caller="svc-a"))[
        0
    ] == 200
    [reply] = await _ask(tmp_path / "admin", {"op": "revoke", "callers": ["alice"]})
    assert reply["purged"] == {"memory": 1, "redis": None}
    assert (await admin_broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 401
    [cached] = await _ask(tmp_path / "admin", {"op": "cached", "callers": ["alice"]})
    assert cached["entries"] == []
    assert (await admin_broker.get_json("/v1/credentials/service-uploads", caller="svc-a"))[
        0
    ] == 200


@pytest.mark.parametrize(
    "request_body",
    [{"op": "revoke"}, {"op": "drop", "callers": ["alice"]}, {"op": "revoke", "callers": "alice"}],
    ids=["nobody", "unknown-op", "not-a-list"],
)
async def test_bad_admin_requests_are_refused(
    admin_broker: BrokerHarness, tmp_path: Path, request_body: dict[str, Any]
) -> None:
    """A malformed admin request gets ok: false and an error, and revokes nobody."""
    [reply] = await _ask(tmp_path / "admin", request_body)
    assert reply["ok"] is False
    assert reply["error"]
    assert (await admin_broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0] == 200


# Real processes: `sts-broker serve` replicas sharing one redis-server, and the CLI.


def _environment() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=ACCESS_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=ACCESS_KEY_SECRET,
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    return env


async def _start(tmp_path: Path, sts_url: str, redis_url: str, keys: Path) -> tuple[Broker, Path]:
    port = _free_port()
    config = _config(tmp_path, port, sts_url, redis_url, keys)
    with config.open("a") as extra:
        extra.write(f"admin: {{socket_dir: {tmp_path / f'admin-{port}'}}}\n")
    log = tmp_path / f"broker-{port}.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            STS_BROKER, "serve", "--config", str(config), env=_environment(), stderr=sink
        )
    return Broker(proc, port, log), config


async def _logged(broker: Broker, event: str, count: int = 1, seconds: float = 20.0) -> None:
    """Wait (bounded) until ``event`` appears ``count`` times in the broker's log."""
    async with asyncio.timeout(seconds):
        while broker.log.read_text(errors="replace").count(f'"{event}"') < count:
            await asyncio.sleep(0.05)


@pytest.fixture
async def replicas(
    tmp_path: Path, redis_server: RedisServer, emulator: tuple[StsEmulator, str]
) -> AsyncIterator[list[tuple[Broker, Path]]]:
    keys = tmp_path / "cache-keys.json"
    keys.write_text(keys_document("k1", k1=new_key()))
    started: list[tuple[Broker, Path]] = []
    try:
        for _ in range(3):
            started.append(await _start(tmp_path, emulator[1], redis_server.url, keys))
        for broker, _ in started:
            await broker.started()
            await _logged(broker, "revocation_listener_subscribed")
        yield started
    finally:
        await asyncio.gather(*(broker.stop() for broker, _ in started))


async def _cli(*args: str) -> tuple[int, Any]:
    proc = await asyncio.create_subprocess_exec(
        STS_BROKER, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, json.loads(out) if out else err.decode()


async def test_revoke_on_one_of_three_replicas_refuses_everywhere_and_purges_redis(
    replicas: list[tuple[Broker, Path]], redis_server: RedisServer
) -> None:
    """`sts-broker revoke` on one replica: svc-1 refused on all 3, none of it in memory or Redis."""
    async with aiohttp.ClientSession() as session:
        for broker, _ in replicas:
            assert (await _get(session, broker, 1))[0] == 200
            assert (await _get(session, broker, 2))[0] == 200
        code, replies = await _cli("revoke", "--config", str(replicas[0][1]), "--caller", "svc-1")
        assert code == 0
        assert replies[0]["purged"]["redis"] == 1
        for broker, _ in replicas[1:]:
            await _logged(broker, "caller_purged")  # the message reached it (bounded wait)
        for broker, config in replicas:
            assert (await _get(session, broker, 1))[0] == 401
            assert (await _get(session, broker, 2))[0] == 200
            code, cached = await _cli("cached", "--config", str(config), "--caller", "svc-1")
            assert code == 0
            assert cached[0]["entries"] == []
    client = Redis.from_url(redis_server.url)
    try:
        assert [key async for key in client.scan_iter("fleet:caller:svc-1")] == []
        assert len([key async for key in client.scan_iter("fleet:cred:*")]) == 1  # svc-2's
    finally:
        await client.aclose()


async def test_cli_without_admin_socket_exits_2(tmp_path: Path) -> None:
    """`sts-broker revoke` against a config without admin.socket_dir exits 2 with a message."""
    config = tmp_path / "broker.yaml"
    config.write_text("logging: {format: json}\n")
    code, message = await _cli("revoke", "--config", str(config), "--caller", "svc-1")
    assert code == 2
    assert "admin.socket_dir" in message


async def test_revoke_reaches_every_worker_of_one_process_group(
    tmp_path: Path, emulator: tuple[StsEmulator, str]
) -> None:
    """`serve --workers 2`: `revoke` reaches both workers; svc-1 refused, svc-2 served."""
    port, socket_dir = _free_port(), tmp_path / "admin"
    config = tmp_path / "broker.yaml"
    config.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"sts: {{endpoint: '{emulator[1]}', timeout_seconds: 5}}\n"
        f"policies_dir: {POLICIES_DIR}\nlogging: {{format: json}}\n"
        f"admin: {{socket_dir: {socket_dir}}}\nauth:\n  api_keys:\n"
        + "".join(
            f"    - {{id: svc-{i}, key_sha256: {hash_api_key(f'k-{i}')}, groups: [internal]}}\n"
            for i in (1, 2)
        )
    )
    log = tmp_path / "broker.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            STS_BROKER,
            "serve",
            "--workers",
            "2",
            "--config",
            str(config),
            env=_environment(),
            stderr=sink,
        )
    broker = Broker(proc, port, log)
    try:
        await _logged(broker, "admin_socket_listening", count=2)
        code, replies = await _cli("revoke", "--config", str(config), "--caller", "svc-1")
        assert code == 0
        assert len(replies) == 2  # one reply per worker
        async with aiohttp.ClientSession() as session:
            for _ in range(4):  # whichever worker the kernel hands the connection to
                assert (await _get(session, broker, 1))[0] == 401
                assert (await _get(session, broker, 2))[0] == 200
    finally:
        await broker.stop()
