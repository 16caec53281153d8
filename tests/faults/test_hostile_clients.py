"""Hostile clients and a stalled log stream in the fault matrix: the broker as a real process.

``sts-broker serve`` through the fault-matrix harness (tests/faults/conftest.py),
with the production logging chain.  Each scenario records what the caller saw:
a stalled stderr stops nothing, a malformed head never prints an API key,
slow clients are cut off (status 0: closed without a reply), a hang-up is a
499 in the metrics and never a 500.  Waits are bounded and wait on an
observable event (a socket closing, a metric, a log line), never on a sleep.
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
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import aiohttp
import pytest
import yaml

from broker.auth import generate_api_key, hash_api_key
from tests.conftest import free_port
from tests.faults.conftest import (
    CALLERS,
    STS_BROKER,
    BrokerProcess,
    FaultySts,
    Matrix,
    Reply,
    StartBroker,
    api_key,
    base_config,
    broker_env,
    check_reply,
    write_probe_policies,
)

LOG_SINK = [sys.executable, "-m", "broker.dev.log_sink"]
CANARY_KEY = generate_api_key()  # a live key of a configured caller, in the sk_ shape
WAIT_SECONDS = 30.0
_CLOSED = Reply(0, None, {"error": {"code": "ClosedWithoutReply"}}, 0.0)
_REQUESTS = "broker_requests_total"
_REAPED = "broker_connections_reaped_total"


def _api_keys_with_canary() -> dict[str, object]:
    """auth: the probe callers plus ``svc-canary`` holding CANARY_KEY."""
    keys = [
        {"id": caller, "key_sha256": hash_api_key(api_key(caller)), "groups": ["probe"]}
        for caller in CALLERS
    ]
    keys.append({"id": "svc-canary", "key_sha256": hash_api_key(CANARY_KEY), "groups": ["probe"]})
    return {"api_keys": keys}


def _sample(metrics: str, name: str, **labels: str) -> float:
    """One sample of a /metrics text (0 when absent)."""
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    sample = f"{name}{{{wanted}}}" if labels else name
    for line in metrics.splitlines():
        head, _, value = line.rpartition(" ")
        if head == sample:
            return float(value)
    return 0.0


def _port(broker: BrokerProcess) -> int:
    port = urlsplit(broker.base_url).port
    assert port is not None
    return port


def _reply(raw: bytes) -> Reply:
    """A raw HTTP reply as a ``Reply`` (status 0 when the broker closed without one)."""
    if not raw:
        return _CLOSED
    head, _, body = raw.partition(b"\r\n\r\n")
    retry_after = re.search(rb"\r\nRetry-After: (\S+)", head)
    return Reply(
        int(head.split(b" ", 2)[1]),
        retry_after.group(1).decode() if retry_after else None,
        json.loads(body) if body.startswith(b"{") else {},
        time.time(),
    )


async def _raw(broker: BrokerProcess, data: bytes) -> bytes:
    """Send ``data`` on a fresh connection; what comes back until the broker closes it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(broker))
    try:
        writer.write(data)
        async with asyncio.timeout(WAIT_SECONDS):
            return await reader.read()
    except ConnectionResetError:
        return b""
    finally:
        await _close(writer)


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# --- item 7: a stalled stderr stops nothing ---
#
# The harness's stderr is an asyncio pipe, which asyncio keeps reading into
# memory (up to 2 MiB) even when nobody looks at it: not a stalled stream.  Here
# the broker's stderr is the dev log sink (broker/dev/log_sink.py --stall),
# which reads nothing at all until SIGUSR1.


@dataclass
class StalledBroker:
    """``sts-broker serve`` whose stderr goes to ``log_sink --stall``."""

    proc: subprocess.Popen[bytes]
    sink: subprocess.Popen[bytes]
    base_url: str
    session: aiohttp.ClientSession

    async def get(self, path: str, key: str = "") -> int:
        headers = _bearer(key) if key else {}
        async with self.session.get(self.base_url + path, headers=headers) as response:
            await response.read()
            return response.status

    async def metrics(self) -> str:
        async with self.session.get(self.base_url + "/metrics") as response:
            return await response.text()

    async def stop(self) -> int:
        """SIGTERM, then the exit code (bounded: a stalled stderr must not hang the exit)."""
        self.proc.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.proc.wait, WAIT_SECONDS)


@pytest.fixture
async def stalled_broker(fault_sts: FaultySts, tmp_path: Path) -> AsyncIterator[StalledBroker]:
    """The broker (16 KiB log buffer) writing to a log sink that reads nothing."""
    port = free_port()
    config = base_config(port, fault_sts.url, write_probe_policies(tmp_path / "policies"))
    config["logging"] = {"format": "json", "max_buffer_bytes": 16384}
    config_path = tmp_path / "broker.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    sink = subprocess.Popen(  # noqa: S603, ASYNC220 - our own interpreter and module
        [*LOG_SINK, "--stall"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert sink.stdin is not None
    assert sink.stderr is not None
    assert b"kill -USR1" in sink.stderr.readline()  # ready to be released
    command = [STS_BROKER, "serve", "--config", str(config_path)]
    proc = subprocess.Popen(command, env=broker_env(), stderr=sink.stdin)  # noqa: S603, ASYNC220
    sink.stdin.close()  # only the broker holds the writing end
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=WAIT_SECONDS))
    broker = StalledBroker(proc, sink, f"http://127.0.0.1:{port}", session)
    try:
        await _wait_ready(broker)
        yield broker
    finally:
        await session.close()
        for child in (proc, sink):
            if child.poll() is None:
                child.kill()
            child.wait()
        for stream in (sink.stdout, sink.stderr):
            if stream is not None:
                stream.close()


async def _wait_ready(broker: StalledBroker) -> None:
    async with asyncio.timeout(WAIT_SECONDS):
        while True:
            assert broker.proc.poll() is None, "the broker exited at start"
            with contextlib.suppress(aiohttp.ClientError):
                if await broker.get("/healthz") == 200:
                    return
            await asyncio.sleep(0.05)


async def _released_output_until(
    sink: subprocess.Popen[bytes], enough: Callable[[bytes], bool]
) -> bytes:
    """SIGUSR1 to the sink, then its output until ``enough`` of it (read in a thread, bounded)."""
    assert sink.stdout is not None
    sink.send_signal(signal.SIGUSR1)
    fd = sink.stdout.fileno()

    def read() -> bytes:
        seen = b""
        while not enough(seen):
            chunk = os.read(fd, 65536)
            assert chunk, "the log ended before the drops were reported"
            seen += chunk
        return seen

    async with asyncio.timeout(WAIT_SECONDS):
        return await asyncio.to_thread(read)


def _notified_drops(output: bytes) -> int:
    """The lines the ``log_lines_dropped`` notices in ``output`` say were lost, in all."""
    complete = output[: output.rfind(b"\n") + 1]  # a line still arriving is not counted yet
    lines = [line for line in complete.splitlines() if b'"event":"log_lines_dropped"' in line]
    return sum(int(json.loads(line)["dropped"]) for line in lines)


async def test_stalled_stderr_never_stops_the_broker(
    fault_sts: FaultySts, stalled_broker: StalledBroker, matrix: Matrix
) -> None:
    """stderr read by nobody: 600 requests, /healthz and /metrics answer; drops counted."""
    broker = stalled_broker
    replies = []
    for index in range(600):
        caller = CALLERS[index % len(CALLERS)]
        async with broker.session.get(
            f"{broker.base_url}/v1/credentials/probe", headers=_bearer(api_key(caller))
        ) as response:
            body = await response.json()
            replies.append(Reply(response.status, None, body, time.time()))
    for reply in replies:
        check_reply(reply, fault_sts)
    assert await broker.get("/healthz") == 200
    dropped = _sample(await broker.metrics(), "broker_log_lines_dropped_total")
    assert dropped > 0
    calls = await fault_sts.received()
    matrix.record("stderr read by nobody (600 credential requests)", replies, calls)
    assert {reply.status for reply in replies} == {200}
    assert calls == len(CALLERS)  # one per scope; the rest from the cache
    # Each notice counts the lines lost since the one before (a stream that was
    # only slow for a moment gets its own): together they account for every drop.
    text = await _released_output_until(
        broker.sink, lambda seen: _notified_drops(seen) >= dropped
    )
    assert _notified_drops(text) >= dropped
    assert await broker.stop() == 0


async def test_sigterm_exits_while_stderr_is_stalled(stalled_broker: StalledBroker) -> None:
    """With stderr stalled and the log buffer full, SIGTERM still ends the broker with exit 0."""
    broker = stalled_broker
    async with asyncio.timeout(WAIT_SECONDS):
        while _sample(await broker.metrics(), "broker_log_lines_dropped_total") == 0:
            assert await broker.get("/v1/policies", api_key("probe-00")) == 200
    assert await broker.stop() == 0


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# --- item 4: no API key reaches the log through a malformed head ---

_MALFORMED_LINES = [
    b"Authorization: %s\x00",
    b"Authorization: Basic %s\x00",
    b"Authorization: Token %s\x7f",
    b"Authorization: Bearer %s" + b"a" * 9000,
    b"X-Api-Key: %s\x01",
]


async def test_canary_key_in_malformed_heads_never_reaches_log_metrics_or_reply(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """Each malformed shape carrying a live key: 400 JSON; the key is in no log line or reply."""
    broker = await start_broker(fault_sts.url, auth=_api_keys_with_canary())
    key = CANARY_KEY.encode()
    head = b"GET /v1/policies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    requests = [head + line % key + b"\r\n\r\n" for line in _MALFORMED_LINES]
    requests.append(b"GET /v1/policies?access_token=" + key + b"\x00 HTTP/1.1\r\n\r\n")
    raw_replies = [await _raw(broker, request) for request in requests]
    ok = await broker.get("/v1/policies", headers=_bearer(CANARY_KEY))  # the key is live
    metrics = await broker.metrics()
    await broker.wait_for_events("request_refused", len(requests))
    assert await broker.stop() == 0
    replies = [_reply(raw) for raw in raw_replies]
    matrix.record("malformed header lines carrying an API key (6 shapes)", replies, 0)
    log_text = "\n".join(broker.log_lines)
    for fragment in (CANARY_KEY, CANARY_KEY[3:19], CANARY_KEY[-16:]):
        assert fragment not in log_text
        assert fragment not in metrics
        assert all(fragment.encode() not in raw for raw in raw_replies)
    assert ok.status == 200
    assert [(reply.status, reply.code) for reply in replies] == [(400, "RequestInvalid")] * 6
    assert _sample(metrics, _REQUESTS, route="unparsed", status="400") == len(requests)
    assert "Traceback" not in log_text


# --- items 5, 10: slow clients are cut off, a hang-up is never a 500 ---


async def test_slow_clients_are_cut_off_and_a_hang_up_is_never_a_500(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """Slow head and half-sent body: the broker closes both; a mid-body hang-up counts 499."""
    listen = {"header_timeout_seconds": 0.5, "body_timeout_seconds": 0.5}
    broker = await start_broker(fault_sts.url, listen=listen)
    slow_head = b"GET /v1/policies HTTP/1.1\r\nX-Pad: " + b"a" * 4000
    matrix.record(
        "slow-header client, one byte per 10 ms", [await _raw_slowly(broker, slow_head)], 0
    )
    post = _half_body_request(api_key("probe-00"))
    matrix.record("half-sent body, then silence", [_reply(await _raw(broker, post))], 0)
    await _hang_up_mid_body(broker, post)
    async with asyncio.timeout(WAIT_SECONDS):
        while (
            _sample(metrics := await broker.metrics(), _REQUESTS, route="presign", status="499") < 1
        ):
            await asyncio.sleep(0.02)
    matrix.record("client hangs up mid-body (counted 499)", [_CLOSED], 0)
    assert {
        reason: _sample(metrics, _REAPED, reason=reason)
        for reason in ("header_timeout", "body_timeout")
    } == {
        "header_timeout": 1,
        "body_timeout": 1,
    }
    assert _sample(metrics, _REQUESTS, route="presign", status="408") == 1
    assert 'status="500"' not in metrics
    assert await broker.stop() == 0
    finished = [e for e in broker.log_events("request_finished") if e["path"] == "/v1/presign"]
    assert [(e["status"], e["error_code"]) for e in finished] == [
        (408, "RequestTimeout"),
        (499, "ClientDisconnected"),
    ]
    assert not broker.log_events("request_crashed")
    assert not any("Traceback" in line for line in broker.log_lines)
    assert await fault_sts.received() == 0


def _half_body_request(key: str) -> bytes:
    """A presign POST announcing 1,000 bytes of body and carrying 10."""
    head = b"POST /v1/presign HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
    return head % key.encode() + b"Content-Length: 1000\r\n\r\n" + b'{"policy":'


async def _raw_slowly(broker: BrokerProcess, head: bytes) -> Reply:
    """Send ``head`` one byte at a time until the broker closes the connection; what it saw."""
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(broker))
    closed = asyncio.ensure_future(reader.read())
    try:
        for index in range(len(head)):
            if closed.done():
                break
            writer.write(head[index : index + 1])
            await asyncio.wait({closed}, timeout=0.01)  # the slow client's pace
        else:
            raise AssertionError("the whole head went out byte by byte and was never cut off")
        return _reply(await closed)
    except ConnectionError:
        return _CLOSED
    finally:
        await _close(writer)


async def _hang_up_mid_body(broker: BrokerProcess, request: bytes) -> None:
    """Send a head, wait until the broker handles it (100 Continue), part of the body, reset."""
    head, _, body = request.partition(b"\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(broker))
    writer.write(head + b"\r\nExpect: 100-continue\r\n\r\n")
    async with asyncio.timeout(WAIT_SECONDS):
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
    writer.write(body)
    await writer.drain()
    writer.transport.abort()
