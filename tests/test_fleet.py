"""A fleet: three real ``sts-broker serve`` processes sharing one Redis and one STS emulator."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from broker.auth import hash_api_key
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from tests.conftest import POLICIES_DIR, RedisServer
from tests.credentials.test_shared_store import keys_document, new_key

STS_BROKER = str(Path(sys.executable).parent / "sts-broker")
ACCESS_KEY_ID, ACCESS_KEY_SECRET = "LTAI-fleet-test", "fleet-secret"
SCOPES = 200  # callers svc-0 .. svc-199, each its own prefix and so its own scope
PATH = "/v1/credentials/service-uploads"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _config(tmp_path: Path, port: int, sts_url: str, redis_url: str, keys: Path) -> Path:
    callers = "".join(
        f"    - id: svc-{i}\n      key_sha256: {hash_api_key(f'k-{i}')}\n      groups: [internal]\n"
        for i in range(SCOPES)
    )
    path = tmp_path / f"broker-{port}.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        f"policies_dir: {POLICIES_DIR}\n"
        "logging: {format: json}\n"
        "quotas: {caller_requests_per_second: 100000, caller_burst: 1000000,"
        " sts_calls_per_second: 100, sts_burst: 100}\n"
        # Redis with its default operation timeout (1 s): the 900-request cold burst keeps
        # each loop busy past it on a loaded machine, which must not count against Redis.
        f"cache:\n  backend: redis\n  redis: {{url: '{redis_url}', key_prefix: 'fleet:',"
        f" encryption_keys_file: {keys}}}\n"
        f"auth:\n  api_keys:\n{callers}",
        encoding="utf-8",
    )
    return path


@dataclass
class Broker:
    """One ``sts-broker serve`` process, its port and its log file."""

    proc: asyncio.subprocess.Process
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}{PATH}"

    async def started(self, seconds: float = 90.0) -> None:  # a hang guard; loaded box: slow
        async with asyncio.timeout(seconds):
            while "broker_started" not in self.log.read_text(errors="replace"):
                if self.proc.returncode is not None:
                    raise AssertionError(f"broker exited: {self.log.read_text()[-2000:]}")
                await asyncio.sleep(0.05)

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


@pytest.fixture
async def emulator() -> AsyncIterator[tuple[StsEmulator, str]]:
    sts = StsEmulator(access_keys={ACCESS_KEY_ID: ACCESS_KEY_SECRET})
    runner, url = await start_sts_emulator(sts)
    yield sts, url
    await runner.cleanup()


@pytest.fixture
async def fleet(
    tmp_path: Path, redis_server: RedisServer, emulator: tuple[StsEmulator, str]
) -> AsyncIterator[list[Broker]]:
    keys = tmp_path / "cache-keys.json"
    keys.write_text(keys_document("k1", k1=new_key()))
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=ACCESS_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=ACCESS_KEY_SECRET,
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    brokers: list[Broker] = []
    try:
        for _ in range(3):
            port = _free_port()
            config = _config(tmp_path, port, emulator[1], redis_server.url, keys)
            log = tmp_path / f"broker-{port}.log"
            with log.open("wb") as sink:
                proc = await asyncio.create_subprocess_exec(
                    STS_BROKER, "serve", "--config", str(config), env=env, stderr=sink
                )
            brokers.append(Broker(proc, port, log))
        await asyncio.gather(*(broker.started() for broker in brokers))
        yield brokers
    finally:
        await asyncio.gather(*(broker.stop() for broker in brokers))


async def _get(session: aiohttp.ClientSession, broker: Broker, caller: int) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer k-{caller}"}
    async with session.get(broker.url, headers=headers) as reply:
        body = await reply.json()
        return reply.status, str(body.get("AccessKeyId", body))


@dataclass
class _Traffic:
    """Replies of the paced flows; an event each time their count reaches a multiple of step."""

    step: int
    replies: list[tuple[int, str]]
    progressed: asyncio.Event

    def add(self, reply: tuple[int, str]) -> None:
        self.replies.append(reply)
        if len(self.replies) % self.step == 0:
            self.progressed.set()

    async def another_step(self) -> None:
        """Return once the count reaches its next multiple of ``step`` (progress, not time)."""
        self.progressed.clear()
        await self.progressed.wait()


async def _flow(
    session: aiohttp.ClientSession,
    brokers: list[Broker],
    turns: Iterator[int],
    stop: asyncio.Event,
    traffic: _Traffic,
) -> None:
    """Paced requests until ``stop``: each new scope once on every broker, round-robin."""
    while not stop.is_set():
        turn = next(turns)
        caller = 1 + (turn // len(brokers)) % (SCOPES - 1)
        traffic.add(await _get(session, brokers[turn % len(brokers)], caller))
        await asyncio.sleep(0.05)  # pacing, not ordering


async def test_fleet_calls_sts_once_and_survives_losing_redis(
    fleet: list[Broker], redis_server: RedisServer, emulator: tuple[StsEmulator, str]
) -> None:
    """3 x 300 concurrent cold requests make 1 AssumeRole; killing Redis mid-run fails none."""
    sts, _ = emulator
    connector = aiohttp.TCPConnector(limit=0)
    # A guard against a hang, not a measurement: a loaded machine may be slow.
    async with asyncio.timeout(120), aiohttp.ClientSession(connector=connector) as session:
        cold = [_get(session, broker, 0) for broker in fleet for _ in range(300)]
        replies = await asyncio.gather(*cold)
        assert {status for status, _ in replies} == {200}
        assert len({key_id for _, key_id in replies}) == 1
        assert sts.assume_role_calls() == 1

        stop, turns = asyncio.Event(), itertools.count()
        traffic = _Traffic(step=30, replies=[], progressed=asyncio.Event())
        flows = [asyncio.create_task(_flow(session, fleet, turns, stop, traffic)) for _ in range(6)]
        await traffic.another_step()  # the first 30 replies, with Redis up
        before_kill = sts.assume_role_calls()
        redis_server.stop()
        await traffic.another_step()  # then 60 without it
        await traffic.another_step()
        stop.set()
        await asyncio.gather(*flows)
    failed = [reply for reply in traffic.replies if reply[0] != 200]
    assert failed == []
    assert sts.assume_role_calls() > before_kill  # new scopes were fetched after the kill
    degraded = sum("shared_cache_degraded" in broker.log.read_text() for broker in fleet)
    assert degraded >= 1
    assert len(traffic.replies) >= 90
