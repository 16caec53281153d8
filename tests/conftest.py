"""Shared fixtures: a movable clock, the STS emulator as a real server, a broker on a socket."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from broker.auth import hash_api_key
from broker.config import Settings
from broker.credentials.sts import static_credential
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from broker.http.app import BrokerRunner, make_app, runner_options
from broker.policies import load_policies
from broker.services import Services, build_services

REPO = Path(__file__).resolve().parent.parent
POLICIES_DIR = REPO / "policies"
TWO_BUCKETS_POLICY = """
name: two-buckets
role_arn: acs:ram::1234567890123456:role/oss-two-buckets
region: cn-hangzhou
grants:
  - bucket: examplebucket
    prefix: "reports/"
    actions: [get]
  - bucket: otherbucket
    prefix: "drop/${subject}/"
    actions: [put]
duration_seconds: 3600
max_url_expires_seconds: 600
callers: ["group:internal"]
"""
"""A policy whose grants name two buckets (presign and post-policy pick by ``bucket``)."""

SOURCE_KEY_ID = "LTAI-test-source-key"
SOURCE_SECRET = "canary-source-secret-7f3a9c"

# caller id -> (api key, groups)
CALLERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "svc-reports": ("canary-apikey-reports-5d1e", ("internal",)),
    "svc-a": ("canary-apikey-svc-a-88c2", ("internal",)),
    "alice": ("canary-apikey-alice-31b7", ("browser",)),
    "nobody": ("canary-apikey-nobody-9e44", ()),
}


class FakeClock:
    """A clock tests move by hand; starts at the real time so STS dates look real."""

    def __init__(self, start: float | None = None) -> None:
        self.now = float(int(time.time())) if start is None else start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeSleep:
    """An injected sleep: records each delay, yields once, then moves the clock to the wake-up."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.delays: list[float] = []

    async def __call__(self, seconds: float) -> None:
        wake_at = self.clock.now + seconds
        self.delays.append(seconds)
        await asyncio.sleep(0)
        self.clock.now = max(self.clock.now, wake_at)


@dataclass
class StsHarness:
    emulator: StsEmulator
    url: str


@dataclass
class BrokerHarness:
    client: TestClient[Any, Any]
    services: Services
    sts: StsHarness
    clock: FakeClock

    def auth(self, caller: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {CALLERS[caller][0]}"}

    async def get_json(
        self, path: str, caller: str | None = "svc-a", **kwargs: Any
    ) -> tuple[int, Any]:
        headers = self.auth(caller) if caller else {}
        async with self.client.get(path, headers=headers, **kwargs) as response:
            return response.status, await response.json()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def sts(clock: FakeClock) -> AsyncIterator[StsHarness]:
    emulator = StsEmulator(
        access_keys={SOURCE_KEY_ID: SOURCE_SECRET},
        clock=clock,
        role_max_duration_seconds={
            "acs:ram::1234567890123456:role/oss-avatar-upload": 43200,
            "acs:ram::1234567890123456:role/oss-service-uploads": 43200,
            "acs:ram::1234567890123456:role/oss-reports-read": 43200,
        },
    )
    runner, url = await start_sts_emulator(emulator)
    yield StsHarness(emulator, url)
    await runner.cleanup()


def make_settings(sts_url: str, policies_dir: Path = POLICIES_DIR, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        # One attempt per STS call and generous quotas, unless a test asks for more:
        # tests/test_resilience_http.py exercises retries, the gate and quotas.
        "sts": {"endpoint": sts_url, "timeout_seconds": 2, "retry": {"max_attempts": 1}},
        "quotas": {"caller_requests_per_second": 1e5, "caller_burst": 1e6, "sts_burst": 100},
        "policies_dir": policies_dir,
        "auth": {
            "api_keys": [
                {"id": caller, "key_sha256": hash_api_key(key), "groups": list(groups)}
                for caller, (key, groups) in CALLERS.items()
            ]
        },
    }
    for section, values in overrides.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    return Settings.model_validate(data)


BrokerFactory = Callable[..., Awaitable[BrokerHarness]]

GUARDED_POLICY = """\
name: guarded-uploads
description: Services add CSV files of up to 1000 bytes and never replace one.
role_arn: acs:ram::1234567890123456:role/oss-service-uploads
bucket: examplebucket
region: cn-hangzhou
prefix: "guarded/${subject}/"
actions: [put, multipart, get, delete]
duration_seconds: 3600
max_url_expires_seconds: 600
content_types: [text/csv]
max_object_bytes: 1000
forbid_overwrite: true
callers: ["group:internal"]
"""


def write_guarded_policies(directory: Path) -> Path:
    """``guarded-uploads`` (forbid_overwrite, 1000 bytes) and ``free-uploads`` (neither)."""
    (directory / "guarded-uploads.yaml").write_text(GUARDED_POLICY)
    free = GUARDED_POLICY.replace("guarded", "free").replace("forbid_overwrite: true\n", "")
    (directory / "free-uploads.yaml").write_text(free.replace("max_object_bytes: 1000\n", ""))
    return directory


async def start_test_server(services: Services, **options: Any) -> TestServer:
    """The broker on 127.0.0.1 with the production runner options (no access log, limits).

    (pytest-aiohttp's ``server_kwargs`` would be dropped by ``TestServer``.)
    """
    server = _BrokerTestServer(make_app(services))
    await server.start_server(**runner_options(services), **options)
    return server


class _BrokerTestServer(TestServer):
    """``TestServer`` with the production runner (``BrokerRunner``)."""

    async def _make_runner(self, **kwargs: Any) -> BrokerRunner:
        return BrokerRunner(self.app, **kwargs)


@pytest.fixture
async def make_broker(
    aiohttp_client: Callable[..., Awaitable[TestClient[Any, Any]]],
    sts: StsHarness,
    clock: FakeClock,
) -> BrokerFactory:
    async def factory(policies_dir: Path = POLICIES_DIR, **overrides: Any) -> BrokerHarness:
        services = emulated_services(sts, clock, policies_dir, **overrides)
        client = await aiohttp_client(await start_test_server(services))
        return BrokerHarness(client, services, sts, clock)

    return factory


def emulated_services(
    sts: StsHarness, clock: FakeClock, policies_dir: Path = POLICIES_DIR, /, **overrides: Any
) -> Services:
    """The broker's services against the STS emulator, on the test clock (no HTTP)."""
    settings = make_settings(sts.url, policies_dir, **overrides)
    return build_services(
        settings,
        load_policies(settings.policies_dir),
        credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
        clock=clock,
    )


@pytest.fixture
async def services(sts: StsHarness, clock: FakeClock) -> AsyncIterator[Services]:
    """``emulated_services`` with the shipped policies; its cache closed after the test."""
    services = emulated_services(sts, clock)
    yield services
    await services.cache.close()


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> BrokerHarness:
    return await make_broker()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A real ``redis-server`` on 127.0.0.1, no persistence; killed by ``stop()``."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed: run `bash tools/install-system-deps.sh`")
        # A port free a moment ago can be taken by another process before redis binds it
        # (a busy machine runs many suites): then redis exits, and another port is tried.
        for _ in range(3):
            self.port = free_port()
            self.url = f"redis://127.0.0.1:{self.port}/0"
            args = [binary, "--port", str(self.port), "--bind", "127.0.0.1"]
            args += ["--save", "", "--appendonly", "no", "--daemonize", "no"]
            quiet = subprocess.DEVNULL
            self._proc = subprocess.Popen(args, stdout=quiet, stderr=quiet)  # noqa: S603 - which()
            if self._started():
                return
        pytest.fail(f"redis-server exited with {self._proc.returncode} on three free ports")

    def _started(self, seconds: float = 30.0) -> bool:
        """True once it answers PING; False if it exited (its port was taken)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                return False
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return True
            time.sleep(0.02)
        self.stop()
        pytest.fail(f"redis-server did not answer PING within {seconds:.0f} s")

    def stop(self) -> None:
        """Kill the server (SIGKILL: no goodbye to clients) and reap it."""
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait(10)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()


def write_jwks(path: Path, public_key: Any, kid: str = "k1", alg: str = "RS256") -> Path:
    """A JWKS file holding ``public_key`` (an RSA public key) as its one signing key."""
    import jwt

    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(public_key))
    jwk.update(kid=kid, alg=alg, use="sig")
    path.write_text(json.dumps({"keys": [jwk]}))
    return path
