"""Hostile clients and a stalled log stream against the broker as a real process (`serve`).

The broker runs as `sts-broker serve` with the production logging chain,
against the STS emulator on 127.0.0.1.  Each test states what the caller sees:
a stalled stderr stops nothing, a malformed head never prints an API key,
slow clients are cut off, a hang-up is a 499 and never a 500.  Waits are
bounded and wait on an observable event (a socket closing, a metric, a log
line), never on a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
import pytest

from broker.auth import generate_api_key, hash_api_key
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from tests.conftest import POLICIES_DIR, free_port

STS_BROKER = str(Path(sys.executable).parent / "sts-broker")
LOG_SINK = [sys.executable, "-m", "broker.dev.log_sink"]
SOURCE_KEY_ID, SOURCE_SECRET = "LTAI-hostile-test", "hostile-source-secret-51c0"
CANARY_KEY = generate_api_key()  # a real key of a configured caller, in the sk_ shape
WAIT_SECONDS = 30.0


@dataclass
class BrokerProcess:
    proc: subprocess.Popen[bytes]
    port: int
    url: str

    async def stop(self) -> int:
        """SIGTERM, then the exit code (bounded: a stalled stderr must not hang the exit)."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, WAIT_SECONDS)

    async def metric(self, session: aiohttp.ClientSession, name: str, **labels: str) -> float:
        """One sample of /metrics (0 when absent)."""
        async with session.get(f"{self.url}/metrics") as resp:
            assert resp.status == 200
            text = await resp.text()
        wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
        for line in text.splitlines():
            sample, _, value = line.rpartition(" ")
            if sample == (f"{name}{{{wanted}}}" if labels else name):
                return float(value)
        return 0.0


@pytest.fixture
async def sts_url() -> AsyncIterator[str]:
    runner, url = await start_sts_emulator(StsEmulator(access_keys={SOURCE_KEY_ID: SOURCE_SECRET}))
    yield url
    await runner.cleanup()


def _env() -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=SOURCE_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=SOURCE_SECRET,
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    return env


def _config(tmp_path: Path, sts_url: str, port: int, listen: str = "", logging: str = "") -> Path:
    """A config for ``serve`` on ``port``: one API key (CANARY_KEY), the example policies."""
    path = tmp_path / "broker.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}{listen}}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        f"policies_dir: {POLICIES_DIR}\n"
        f"logging: {{format: json{logging}}}\n"
        "quotas: {caller_requests_per_second: 100000, caller_burst: 1000000}\n"
        "auth:\n  api_keys:\n"
        f"    - {{id: svc-canary, key_sha256: {hash_api_key(CANARY_KEY)}, groups: [internal]}}\n"
    )
    return path


@contextlib.asynccontextmanager
async def _broker(config: Path, port: int, stderr: IO[bytes]) -> AsyncIterator[BrokerProcess]:
    """``sts-broker serve`` with ``stderr`` as its log stream; killed if still running after."""
    command = [STS_BROKER, "serve", "--config", str(config)]
    proc = subprocess.Popen(command, env=_env(), stderr=stderr)  # noqa: S603, ASYNC220
    broker = BrokerProcess(proc, port, f"http://127.0.0.1:{port}")
    try:
        await _wait_ready(broker)
        yield broker
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def _wait_ready(broker: BrokerProcess) -> None:
    async with asyncio.timeout(WAIT_SECONDS), aiohttp.ClientSession() as session:
        while True:
            assert broker.proc.poll() is None, "the broker exited at start"
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(f"{broker.url}/healthz") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.05)


@dataclass
class StalledSink:
    """broker/dev/log_sink.py --stall at the reading end of a pipe."""

    proc: subprocess.Popen[bytes]

    def release(self) -> None:
        self.proc.send_signal(signal.SIGUSR1)


@pytest.fixture
def stalled_sink() -> Iterator[StalledSink]:
    proc = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [*LOG_SINK, "--stall"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    assert b"kill -USR1" in proc.stderr.readline()  # ready to be released
    yield StalledSink(proc)
    if proc.poll() is None:
        proc.kill()
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


async def _read_until(stream: IO[bytes], marker: bytes) -> bytes:
    """Read ``stream`` (in a thread) until ``marker`` has been read; everything read."""

    def read() -> bytes:
        seen = b""
        while marker not in seen:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"the stream ended before {marker!r}"
            seen += chunk
        return seen

    async with asyncio.timeout(WAIT_SECONDS):
        return await asyncio.to_thread(read)


def _bearer(key: str = CANARY_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- item 7: a stalled stderr stops nothing ---


async def test_stalled_stderr_never_stops_the_broker(
    tmp_path: Path, sts_url: str, stalled_sink: StalledSink
) -> None:
    """stderr a pipe nobody reads: 600 requests, /healthz and /metrics answer; drops counted."""
    port = free_port()
    config = _config(tmp_path, sts_url, port, logging=", max_buffer_bytes: 16384")
    assert stalled_sink.proc.stdin is not None
    assert stalled_sink.proc.stdout is not None
    async with _broker(config, port, stalled_sink.proc.stdin) as broker:
        stalled_sink.proc.stdin.close()  # only the broker holds the writing end now
        timeout = aiohttp.ClientTimeout(total=WAIT_SECONDS)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for index in range(600):
                path = "/v1/credentials/service-uploads" if index % 50 == 0 else "/v1/policies"
                async with session.get(f"{broker.url}{path}", headers=_bearer()) as resp:
                    assert resp.status == 200
            async with session.get(f"{broker.url}/healthz") as resp:
                assert resp.status == 200
            dropped = await broker.metric(session, "broker_log_lines_dropped_total")
        assert dropped > 0
        stalled_sink.release()
        text = await _read_until(stalled_sink.proc.stdout, b'"event":"log_lines_dropped"')
        assert await broker.stop() == 0
    notice = json.loads(next(line for line in text.splitlines() if b"log_lines_dropped" in line))
    assert notice["dropped"] >= dropped
    assert CANARY_KEY.encode() not in text


async def test_sigterm_exits_while_stderr_is_stalled(
    tmp_path: Path, sts_url: str, stalled_sink: StalledSink
) -> None:
    """With stderr stalled and the buffer full, SIGTERM still ends the broker with exit 0."""
    port = free_port()
    config = _config(tmp_path, sts_url, port, logging=", max_buffer_bytes: 16384")
    assert stalled_sink.proc.stdin is not None
    async with _broker(config, port, stalled_sink.proc.stdin) as broker:
        stalled_sink.proc.stdin.close()
        async with asyncio.timeout(WAIT_SECONDS), aiohttp.ClientSession() as session:
            while await broker.metric(session, "broker_log_lines_dropped_total") == 0:
                async with session.get(f"{broker.url}/v1/policies", headers=_bearer()) as resp:
                    assert resp.status == 200
        assert await broker.stop() == 0


# --- items 4, 5, 10: malformed heads, slow clients, hang-ups ---

_REQUESTS = "broker_requests_total"
_REAPED = "broker_connections_reaped_total"

_MALFORMED_LINES = [
    b"Authorization: %s\x00",
    b"Authorization: Basic %s\x00",
    b"Authorization: Token %s\x7f",
    b"Authorization: Bearer %s" + b"a" * 9000,
    b"X-Api-Key: %s\x01",
]


async def _raw(broker: BrokerProcess, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; what comes back until the broker closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT_SECONDS):
            return await reader.read()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def test_canary_key_in_malformed_heads_never_reaches_log_metrics_or_reply(
    tmp_path: Path, sts_url: str
) -> None:
    """Each malformed shape carrying a live key: 400 JSON; the key is in no log line or reply."""
    log_file = tmp_path / "stderr.log"
    key = CANARY_KEY.encode()
    port = free_port()
    with log_file.open("wb") as stderr:
        async with _broker(_config(tmp_path, sts_url, port), port, stderr) as broker:
            head = b"GET /v1/policies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            requests = [head + line % key + b"\r\n\r\n" for line in _MALFORMED_LINES]
            requests.append(b"GET /v1/policies?access_token=" + key + b"\x00 HTTP/1.1\r\n\r\n")
            replies = [await _raw(broker, request) for request in requests]
            async with aiohttp.ClientSession() as session:
                async with session.get(f"{broker.url}/metrics") as resp:
                    metrics = (await resp.read()).decode()
                refused = await broker.metric(
                    session, "broker_requests_total", route="unparsed", status="400"
                )
            assert await broker.stop() == 0
    log_text = log_file.read_text()
    for fragment in (CANARY_KEY, CANARY_KEY[3:19], CANARY_KEY[-16:]):
        assert fragment not in log_text
        assert fragment not in metrics
        assert all(fragment.encode() not in reply for reply in replies)
    assert all(re.match(rb"HTTP/1\.[01] 400 ", reply) for reply in replies)
    assert all(b'"code":"RequestInvalid"' in reply for reply in replies)
    assert refused == len(requests)
    assert log_text.count('"event":"request_refused"') == len(requests)
    assert "Traceback" not in log_text


async def test_slow_clients_are_cut_off_and_a_hang_up_is_never_a_500(
    tmp_path: Path, sts_url: str
) -> None:
    """Slow head and half-sent body: the broker closes both; a mid-body hang-up counts 499."""
    log_file = tmp_path / "stderr.log"
    listen = ", header_timeout_seconds: 0.5, body_timeout_seconds: 0.5"
    post = b"POST /v1/presign HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
    post = post % CANARY_KEY.encode() + b"Content-Length: 1000\r\n\r\n" + b'{"policy":'
    port = free_port()
    config = _config(tmp_path, sts_url, port, listen=listen)
    with log_file.open("wb") as stderr:
        async with _broker(config, port, stderr) as broker:
            slow_head = b"GET /v1/policies HTTP/1.1\r\nX-Pad: " + b"a" * 4000
            assert await _raw_slowly(broker, slow_head) == b""
            assert await _raw(broker, post) == b""  # half a body, then silence: cut off
            await _hang_up_mid_body(broker, post)
            async with asyncio.timeout(WAIT_SECONDS), aiohttp.ClientSession() as session:
                presign = {"route": "presign"}
                while await broker.metric(session, _REQUESTS, **presign, status="499") < 1:
                    await asyncio.sleep(0.02)
                counts = {
                    reason: await broker.metric(session, _REAPED, reason=reason)
                    for reason in ("header_timeout", "body_timeout")
                }
                timed_out = await broker.metric(session, _REQUESTS, **presign, status="408")
                crashed = await broker.metric(session, _REQUESTS, **presign, status="500")
            assert await broker.stop() == 0
    assert counts == {"header_timeout": 1, "body_timeout": 1}
    assert (timed_out, crashed) == (1, 0)
    log_text = log_file.read_text()
    assert '"error_code":"ClientDisconnected"' in log_text
    assert "request_crashed" not in log_text
    assert "Traceback" not in log_text


async def _raw_slowly(broker: BrokerProcess, head: bytes) -> bytes:
    """Send ``head`` one byte at a time until the broker closes the connection; its reply."""
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    closed = asyncio.ensure_future(reader.read())
    try:
        for index in range(len(head)):
            if closed.done():
                break
            writer.write(head[index : index + 1])
            await asyncio.wait({closed}, timeout=0.01)  # the slow client's pace
        else:
            pytest.fail("the whole head went out one byte at a time and was never cut off")
        return await closed
    except ConnectionError:
        return b""
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _hang_up_mid_body(broker: BrokerProcess, request: bytes) -> None:
    """Send a head, wait until the broker handles it, send part of the body, reset."""
    head, _, body = request.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", broker.port)
    writer.write(head + b"\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(WAIT_SECONDS):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    await writer.drain()
    writer.transport.abort()
