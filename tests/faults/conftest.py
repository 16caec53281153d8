"""The fault-matrix harness: ``sts-broker serve`` as a real process against a scripted STS.

Fixtures, meant to be reused by every fault scenario (STS, connections, logs,
JWKS, reload...):

* ``fault_sts`` → ``FaultySts``: the STS emulator as a real server on
  127.0.0.1 in this process, faults scripted over its admin endpoint
  (``script``, ``clear``), counts read from ``/__emulator__/calls``.
  ``make_fault_sts(**emulator_options)`` makes one with other options.
* ``start_broker`` → a factory: ``await start_broker(sts_url, sts={...}, cache={...})``
  writes a config (sections merged over ``base_config``) and the probe
  policies (``PROBE_POLICIES``) to a temporary directory, runs
  ``sts-broker serve`` with the broker's identity in the environment (the
  default credential chain), waits for ``broker_started`` and returns a
  ``BrokerProcess``.  Its stderr is read all the time (a pipe nobody reads
  would block the broker) and kept as ``log_lines`` / ``log_events()``;
  ``read_log=False`` stops reading after ``broker_started`` (a blocked log
  sink), ``extra_args`` are added to ``serve`` (``--workers 2``), ``extra_env``
  to its environment.
* ``Reply`` is what a caller saw; ``check_reply`` asserts the matrix's
  invariants on it (no 500; a 503/504 carries Retry-After, a 502 does not;
  a 200 is not expired, by the local clock nor by STS's own).
* ``matrix`` collects one row per scenario; with ``FAULT_MATRIX_REPORT=path``
  the session writes them as a Markdown table.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from broker.auth import hash_api_key
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from tests.conftest import free_port

STS_BROKER = str(Path(sys.executable).parent / "sts-broker")
SOURCE_KEY_ID = "LTAI-fault-matrix"
SOURCE_SECRET = "canary-fault-matrix-source-secret-41c9"
ACCOUNT = "1234567890123456"

CALLERS = [f"probe-{index:02d}" for index in range(12)]
"""Twelve API-key callers (``probe-00``...), each with its own prefix, so its own scope."""

PROBE_POLICIES: dict[str, dict[str, Any]] = {
    "probe": {
        "description": "Fault-matrix probe: one scope per caller, one-hour tokens.",
        "role_arn": f"acs:ram::{ACCOUNT}:role/fault-probe",
        "duration_seconds": 3600,
    },
    "probe-short": {
        "description": "Fault-matrix probe: 15-minute tokens.",
        "role_arn": f"acs:ram::{ACCOUNT}:role/fault-probe",
        "duration_seconds": 900,
    },
}


def api_key(caller: str) -> str:
    """The API key of a probe caller (a canary: it must never show up in a log)."""
    return f"canary-key-{caller}-7d2e"


@dataclass(frozen=True)
class Reply:
    """What a caller saw: status, the headers that matter, the JSON body, when it arrived."""

    status: int
    retry_after: str | None
    body: dict[str, Any]
    received_at: float

    @property
    def code(self) -> str:
        """The error code, or ``OK``."""
        if self.status == 200:
            return "OK"
        return str(self.body.get("error", {}).get("code", "?"))


class FaultySts:
    """The STS emulator as a real server, scripted over HTTP as dev mode users would."""

    def __init__(self, emulator: StsEmulator, url: str) -> None:
        self.emulator = emulator
        self.url = url

    async def script(self, **faults: Any) -> None:
        """POST faults to ``/__emulator__/faults`` (see ``sts_faults`` for every field)."""
        await self._send("POST", "/__emulator__/faults", faults)

    async def clear(self) -> None:
        """Switch every fault off."""
        await self._send("DELETE", "/__emulator__/faults", None)

    async def counts(self) -> dict[str, Any]:
        """``received``, ``calls``, ``issued`` and each call's outcome."""
        return await self._send("GET", "/__emulator__/calls", None)

    async def received(self) -> int:
        """AssumeRole requests that reached STS so far, answered or not."""
        return int((await self.counts())["received"])

    def real_expiry(self, access_key_id: str, skew_seconds: float = 0.0) -> float:
        """When a token issued by this STS really expires, on the local clock."""
        return self.emulator.issued[access_key_id].expires_at - skew_seconds

    async def _send(self, method: str, path: str, body: Any) -> Any:
        async with (
            aiohttp.ClientSession() as session,
            session.request(method, self.url + path, json=body) as reply,
        ):
            assert reply.status == 200, await reply.text()
            return await reply.json()


@dataclass
class BrokerProcess:
    """A running ``sts-broker serve`` and what it wrote to stderr."""

    proc: asyncio.subprocess.Process
    base_url: str
    config_path: Path
    log_lines: list[str] = field(default_factory=list)
    session: aiohttp.ClientSession | None = None

    async def credentials(
        self, caller: str = "probe-00", policy: str = "probe", **query: str
    ) -> Reply:
        """``GET /v1/credentials/{policy}`` as ``caller``."""
        headers = {"Authorization": f"Bearer {api_key(caller)}"}
        return await self.get(f"/v1/credentials/{policy}", headers=headers, params=query)

    async def get(self, path: str, **kwargs: Any) -> Reply:
        """A GET to the broker, as a ``Reply``."""
        assert self.session is not None
        async with self.session.get(self.base_url + path, **kwargs) as response:
            text = await response.text()
            body = json.loads(text) if response.content_type == "application/json" else {}
            return Reply(response.status, response.headers.get("Retry-After"), body, time.time())

    async def metrics(self) -> str:
        """The ``/metrics`` text."""
        assert self.session is not None
        async with self.session.get(self.base_url + "/metrics") as response:
            return await response.text()

    async def wait_for_events(self, event: str, count: int = 1) -> list[dict[str, Any]]:
        """The first ``count`` records named ``event``, once written (logs are batched)."""
        async with asyncio.timeout(15):
            while len(records := self.log_events(event)) < count:
                await asyncio.sleep(0.02)
        return records

    def log_events(self, event: str) -> list[dict[str, Any]]:
        """Every JSON log record named ``event`` so far."""
        records = []
        for line in self.log_lines:
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    records.append(record)
        return records

    async def stop(self) -> int:
        """SIGTERM, then the exit code (SIGKILL after 20 s)."""
        if self.session is not None:
            await self.session.close()
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(20):
                    return await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
        return await self.proc.wait()


def base_config(port: int, sts_url: str, policies_dir: Path) -> dict[str, Any]:
    """The broker's config before a scenario's changes: defaults where the matrix allows."""
    return {
        "listen": {"host": "127.0.0.1", "port": port, "shutdown_timeout_seconds": 5},
        "sts": {
            "endpoint": sts_url,
            "timeout_seconds": 2,
            "retry": {"max_attempts": 3, "base_delay_seconds": 0.05, "deadline_seconds": 8},
            "failure_gate": {"threshold": 3, "open_seconds": 30},
        },
        "policies_dir": str(policies_dir),
        "logging": {"format": "json"},
        "quotas": {"caller_requests_per_second": 1000, "caller_burst": 1000},
        "auth": {
            "api_keys": [
                {"id": caller, "key_sha256": hash_api_key(api_key(caller)), "groups": ["probe"]}
                for caller in CALLERS
            ]
        },
    }


def write_probe_policies(directory: Path) -> Path:
    """The probe policies as YAML files in ``directory``."""
    directory.mkdir(parents=True, exist_ok=True)
    for name, fields in PROBE_POLICIES.items():
        document = {
            "name": name,
            "bucket": "examplebucket",
            "region": "cn-hangzhou",
            "prefix": "probe/${subject}/",
            "actions": ["get", "put"],
            "max_url_expires_seconds": 600,
            "callers": ["group:probe"],
            **fields,
        }
        (directory / f"{name}.yaml").write_text(yaml.safe_dump(document), encoding="utf-8")
    return directory


def _merged(base: dict[str, Any], changes: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def broker_env() -> dict[str, str]:
    """The environment, with the broker's own identity for the default credential chain."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=SOURCE_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=SOURCE_SECRET,
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    return env


async def _read_stderr(
    stream: asyncio.StreamReader, lines: list[str], started: asyncio.Event, *, keep: bool = True
) -> None:
    """Keep the pipe drained (unless not ``keep``: then only until ``broker_started``)."""
    while line := await stream.readline():
        text = line.decode("utf-8", "replace").rstrip("\n")
        lines.append(text)
        if '"broker_started"' in text:
            started.set()
            if not keep:
                return
    started.set()  # the process ended: let the waiter look


StartBroker = Callable[..., Awaitable[BrokerProcess]]
MakeFaultySts = Callable[..., Awaitable[FaultySts]]


@pytest.fixture
async def make_fault_sts() -> AsyncIterator[MakeFaultySts]:
    runners = []

    async def make(**options: Any) -> FaultySts:
        role_max = {f"acs:ram::{ACCOUNT}:role/fault-probe": 43200}
        emulator = StsEmulator(
            access_keys={SOURCE_KEY_ID: SOURCE_SECRET},
            role_max_duration_seconds=role_max,
            **options,
        )
        runner, url = await start_sts_emulator(emulator)
        runners.append(runner)
        return FaultySts(emulator, url)

    yield make
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def fault_sts(make_fault_sts: MakeFaultySts) -> FaultySts:
    return await make_fault_sts()


@pytest.fixture
async def start_broker(tmp_path: Path) -> AsyncIterator[StartBroker]:
    brokers: list[BrokerProcess] = []
    readers: list[asyncio.Task[None]] = []

    async def start(
        sts_url: str,
        *,
        read_log: bool = True,
        extra_args: Sequence[str] = (),
        extra_env: Mapping[str, str] | None = None,
        **changes: Any,
    ) -> BrokerProcess:
        port = free_port()
        home = tmp_path / f"broker-{len(brokers)}"
        policies = write_probe_policies(home / "policies")
        config = _merged(base_config(port, sts_url, policies), changes)
        config_path = home / "broker.yaml"
        config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
        proc = await asyncio.create_subprocess_exec(
            STS_BROKER,
            *("serve", "--config", str(config_path), *extra_args),
            env={**broker_env(), **(extra_env or {})},
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            limit=1 << 20,  # long log lines (hostile requests) must not stop the reader
        )
        broker = BrokerProcess(proc, f"http://127.0.0.1:{port}", config_path)
        brokers.append(broker)
        started = asyncio.Event()
        assert proc.stderr is not None
        reader = _read_stderr(proc.stderr, broker.log_lines, started, keep=read_log)
        readers.append(asyncio.create_task(reader))
        async with asyncio.timeout(30):
            await started.wait()
        if proc.returncode is not None or not broker.log_events("broker_started"):
            raise AssertionError("the broker did not start:\n" + "\n".join(broker.log_lines))
        broker.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
        return broker

    yield start
    for broker in brokers:
        await broker.stop()
    for reader in readers:
        with contextlib.suppress(asyncio.CancelledError):
            await reader


def check_reply(reply: Reply, sts: FaultySts, *, skew_seconds: float = 0.0) -> None:
    """The matrix's invariants: never 500, Retry-After as documented, never expired."""
    assert reply.status != 500, reply.body
    if reply.status in (503, 504):
        assert reply.retry_after is not None, reply.body
        assert int(reply.retry_after) >= 1
    if reply.status == 502:
        assert reply.retry_after is None
    if reply.status != 200:
        assert "AccessKeySecret" not in reply.body
        return
    expiration = datetime.strptime(reply.body["Expiration"], "%Y-%m-%dT%H:%M:%SZ")
    served_until = expiration.replace(tzinfo=UTC).timestamp()
    assert served_until > reply.received_at, "served an expired credential (local clock)"
    assert reply.body["ExpiresIn"] > 0
    real = sts.real_expiry(reply.body["AccessKeyId"], skew_seconds)
    assert served_until <= real, "served beyond the token's real end (STS's clock)"


@dataclass
class MatrixRow:
    """One scenario as the caller saw it."""

    scenario: str
    statuses: list[int]
    retry_after: list[str | None]
    codes: list[str]
    sts_calls: int


@dataclass
class Matrix:
    """The rows the scenarios recorded, in the order they ran."""

    rows: list[MatrixRow] = field(default_factory=list)

    def record(self, scenario: str, replies: list[Reply], sts_calls: int) -> None:
        """Note what ``replies`` showed the caller and how many STS calls they cost."""
        self.rows.append(
            MatrixRow(
                scenario,
                [reply.status for reply in replies],
                [reply.retry_after for reply in replies],
                [reply.code for reply in replies],
                sts_calls,
            )
        )

    def markdown(self) -> str:
        """The rows as a Markdown table."""
        lines = [
            "| scenario | caller saw (status code, Retry-After) | STS calls |",
            "| --- | --- | --- |",
        ]
        for row in self.rows:
            seen = ", ".join(
                f"{status} {code}" + (f" RA={ra}" if ra else "")
                for status, code, ra in zip(row.statuses, row.codes, row.retry_after, strict=True)
            )
            lines.append(f"| {row.scenario} | {_compress(seen)} | {row.sts_calls} |")
        return "\n".join(lines) + "\n"


def _compress(seen: str) -> str:
    """``a, a, a, b`` → ``a x3, b``."""
    parts = seen.split(", ")
    out: list[str] = []
    counts: list[int] = []
    for part in parts:
        if out and out[-1] == part:
            counts[-1] += 1
        else:
            out.append(part)
            counts.append(1)
    return ", ".join(p if n == 1 else f"{p} x{n}" for p, n in zip(out, counts, strict=True))


_MATRIX = Matrix()


@pytest.fixture
def matrix() -> Iterator[Matrix]:
    yield _MATRIX
    path = os.environ.get("FAULT_MATRIX_REPORT")
    if path:
        Path(path).write_text(_MATRIX.markdown(), encoding="utf-8")
