"""Hostile connections: malformed heads stay out of the log, slow clients are reaped, hang-ups 499.

Raw sockets on 127.0.0.1 against the broker with the production runner and the
production logging chain (through the ``LogSink``).  Timeouts are configured
in fractions of a second; tests wait (boundedly) for the socket to close or a
metric to move, never sleep to order events.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

import pytest
import structlog

from broker.auth import generate_api_key, hash_api_key
from broker.logs import LogSink, configure_logging
from tests.conftest import CALLERS, BrokerFactory, BrokerHarness
from tests.wire import raw_request, raw_status

WAIT_SECONDS = 20.0  # the bound on every wait: far above any configured timeout


@dataclass
class ProductionLog:
    stream: io.StringIO
    sink: LogSink

    def text(self) -> str:
        """Everything written so far (after the writer thread has caught up)."""
        assert self.sink.flush(WAIT_SECONDS)
        return self.stream.getvalue()


@pytest.fixture
def production_log() -> Iterator[ProductionLog]:
    """The daemon's logging chain (JSON, info, through a LogSink), captured in memory."""
    stream = io.StringIO()
    sink = configure_logging("json", "info", stream=stream, background=True)
    assert sink is not None
    yield ProductionLog(stream, sink)
    sink.close()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _sample(broker: BrokerHarness, name: str, **labels: str) -> float:
    value = broker.services.metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def _until(condition: Callable[[], bool], what: str) -> None:
    """Poll ``condition`` until it holds (bounded by WAIT_SECONDS)."""
    async with asyncio.timeout(WAIT_SECONDS):
        while not condition():
            await asyncio.sleep(0.01)
    assert condition(), what


async def _connect(broker: BrokerHarness) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(broker.client.host, broker.client.port)


async def _read_until_closed(reader: asyncio.StreamReader) -> bytes:
    """What the server sends until it closes the connection (bounded by WAIT_SECONDS)."""
    try:
        async with asyncio.timeout(WAIT_SECONDS):
            return await reader.read()
    except ConnectionResetError:
        return b""


async def _read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP response on a kept-alive connection: its status and body."""
    async with asyncio.timeout(WAIT_SECONDS):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return raw_status(head), await reader.readexactly(length)


def _keepalive_request(path: bytes, key: str) -> bytes:
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n\r\n" % (
        path,
        key.encode(),
    )


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError):
        await writer.wait_closed()


# --- item 4: no API key reaches the log through a malformed request head ---

SK_KEY = generate_api_key()
_SHAPELESS_KEY = CALLERS["alice"][0]


def _malformed_heads(key: bytes) -> dict[str, bytes]:
    """The issue's malformed shapes, each carrying ``key``, as raw request bytes."""
    head = b"GET /v1/policies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    lines = {
        "authorization-nul": b"Authorization: " + key + b"\x00",
        "basic-nul": b"Authorization: Basic " + key + b"\x00",
        "token-del": b"Authorization: Token " + key + b"\x7f",
        "bearer-9000-bytes": b"Authorization: Bearer " + key + b"a" * 9000,
        "x-api-key-soh": b"X-Api-Key: " + key + b"\x01",
    }
    heads = {name: head + line + b"\r\nConnection: close\r\n\r\n" for name, line in lines.items()}
    heads["query-nul"] = b"GET /v1/policies?access_token=" + key + b"\x00 HTTP/1.1\r\n\r\n"
    return heads


@pytest.mark.parametrize("key", [SK_KEY, _SHAPELESS_KEY], ids=["sk-key", "shapeless-key"])
async def test_malformed_heads_never_put_the_key_in_log_metrics_or_reply(
    make_broker: BrokerFactory, production_log: ProductionLog, key: str
) -> None:
    """Each malformed-header shape carrying a live API key: 400 JSON, key absent everywhere."""
    api_keys = [{"id": "svc-canary", "key_sha256": hash_api_key(key), "groups": ["internal"]}]
    broker = await make_broker(auth={"api_keys": api_keys})
    heads = _malformed_heads(key.encode())
    replies = []
    for raw in heads.values():
        reader, writer = await _connect(broker)
        writer.write(raw)
        replies.append(await _read_until_closed(reader))
        await _close(writer)
    async with broker.client.get("/metrics") as resp:
        metrics_text = await resp.text()
    log_text = production_log.text()
    fragments = [key, key[3:19], key[-16:]]
    for fragment in fragments:
        assert fragment not in log_text
        assert fragment not in metrics_text
        assert all(fragment.encode() not in reply for reply in replies)
    assert [raw_status(reply) for reply in replies] == [400] * len(heads)
    assert all(b'"code":"RequestInvalid"' in reply for reply in replies)
    assert log_text.count('"event":"request_refused"') == len(heads)
    assert "Error handling request" not in log_text
    assert _sample(broker, "broker_requests_total", route="unparsed", status="400") == len(heads)
    assert broker.sts.emulator.calls == []


async def test_refused_head_is_logged_by_status_and_class_with_its_request_id(
    broker: BrokerHarness, production_log: ProductionLog
) -> None:
    """A refused head logs request_refused with status, exception class and the reply's id."""
    reader, writer = await _connect(broker)
    writer.write(_malformed_heads(SK_KEY.encode())["authorization-nul"])
    reply = await _read_until_closed(reader)
    await _close(writer)
    request_id = reply.split(b"X-Request-Id: ", 1)[1].split(b"\r\n", 1)[0].decode()
    line = next(
        line for line in production_log.text().splitlines() if "request_refused" in line
    )
    assert f'"request_id":"{request_id}"' in line
    assert '"reason":"BadHttpMessage"' in line
    assert '"status":400' in line


# --- item 10: slow and idle clients are reaped ---


async def test_slow_header_client_is_dropped(
    make_broker: BrokerFactory, production_log: ProductionLog
) -> None:
    """A client sending its head one byte at a time is cut off at header_timeout_seconds."""
    broker = await make_broker(listen={"header_timeout_seconds": 0.3})
    reader, writer = await _connect(broker)
    closed = asyncio.ensure_future(_read_until_closed(reader))
    head = b"GET /v1/policies HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 4000
    sent = 0
    try:
        while not closed.done() and sent < len(head):
            writer.write(head[sent : sent + 1])
            sent += 1
            await asyncio.wait({closed}, timeout=0.01)  # the slow client's pace
    except ConnectionError:
        pass
    assert await closed == b""  # closed without a reply
    assert sent < len(head)  # long before the head could have been finished
    await _close(writer)
    assert _sample(broker, "broker_connections_reaped_total", reason="header_timeout") == 1
    assert '"reason":"header_timeout"' in production_log.text()


async def test_connection_that_sends_nothing_is_dropped(make_broker: BrokerFactory) -> None:
    """A connection that opens and sends nothing is closed at header_timeout_seconds."""
    broker = await make_broker(listen={"header_timeout_seconds": 0.2})
    reader, writer = await _connect(broker)
    assert await _read_until_closed(reader) == b""
    await _close(writer)
    assert _sample(broker, "broker_connections_reaped_total", reason="header_timeout") == 1


async def test_idle_keepalive_connection_is_not_held_to_the_header_timeout(
    make_broker: BrokerFactory,
) -> None:
    """Between requests the keep-alive timeout applies, not the (shorter) header timeout."""
    listen = {"header_timeout_seconds": 0.2, "keepalive_timeout_seconds": 60}
    broker = await make_broker(listen=listen)
    key = CALLERS["svc-a"][0]
    reader, writer = await _connect(broker)
    writer.write(_keepalive_request(b"/v1/policies", key))
    assert (await _read_response(reader))[0] == 200
    # A silent connection opened after that reply is reaped: more than the header
    # timeout has now passed while the first connection sat idle.
    other_reader, other_writer = await _connect(broker)
    assert await _read_until_closed(other_reader) == b""
    await _close(other_writer)
    writer.write(_keepalive_request(b"/v1/policies", key))
    assert (await _read_response(reader))[0] == 200
    await _close(writer)
    assert _sample(broker, "broker_connections_reaped_total", reason="header_timeout") == 1


async def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(
    make_broker: BrokerFactory,
) -> None:
    """An idle keep-alive connection is closed after keepalive_timeout_seconds."""
    broker = await make_broker(listen={"keepalive_timeout_seconds": 0.3})
    reader, writer = await _connect(broker)
    writer.write(_keepalive_request(b"/healthz", CALLERS["svc-a"][0]))
    assert (await _read_response(reader))[0] == 200
    assert await _read_until_closed(reader) == b""
    await _close(writer)
    assert _sample(broker, "broker_connections_reaped_total", reason="header_timeout") == 0


async def test_half_sent_body_is_cut_off_and_counted_as_408(
    make_broker: BrokerFactory, production_log: ProductionLog
) -> None:
    """A body still incomplete at body_timeout_seconds: connection closed, 408, no 500."""
    broker = await make_broker(listen={"body_timeout_seconds": 0.3})
    reader, writer = await _connect(broker)
    head = raw_request(b"/v1/presign", b"Authorization: Bearer " + CALLERS["alice"][0].encode())
    head = head.replace(b"Connection: close", b"Content-Length: 1000")
    writer.write(head.replace(b"GET ", b"POST ", 1) + b'{"policy":')
    assert await _read_until_closed(reader) == b""
    await _close(writer)
    await _until(
        lambda: _sample(broker, "broker_requests_total", route="presign", status="408") == 1,
        "the cut-off request is counted as 408",
    )
    assert _sample(broker, "broker_connections_reaped_total", reason="body_timeout") == 1
    assert _sample(broker, "broker_requests_total", route="presign", status="500") == 0
    text = production_log.text()
    assert '"error_code":"RequestTimeout"' in text
    assert "request_crashed" not in text


HangUp = Callable[[asyncio.StreamWriter], Awaitable[None]]


async def _abort(writer: asyncio.StreamWriter) -> None:
    writer.transport.abort()


async def _half_close(writer: asyncio.StreamWriter) -> None:
    writer.write_eof()


@pytest.mark.parametrize("hang_up", [_abort, _half_close], ids=["reset", "half-close"])
async def test_client_hanging_up_mid_body_is_a_499_not_a_500(
    broker: BrokerHarness, production_log: ProductionLog, hang_up: HangUp
) -> None:
    """Content-Length larger than what is sent, then the client leaves: 499, no crash, no 500."""
    reader, writer = await _connect(broker)
    auth = b"Authorization: Bearer " + CALLERS["alice"][0].encode()
    head = b"POST /v1/presign HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\nContent-Length: 1000\r\n"
    writer.write(head % auth + b"Expect: 100-continue\r\n\r\n")
    async with asyncio.timeout(WAIT_SECONDS):  # the broker is handling the request now
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 100 Continue")
    writer.write(b'{"policy":')
    await writer.drain()
    await hang_up(writer)
    await _until(
        lambda: _sample(broker, "broker_requests_total", route="presign", status="499") == 1,
        "the hang-up is counted as 499",
    )
    await _close(writer)
    assert _sample(broker, "broker_requests_total", route="presign", status="500") == 0
    text = production_log.text()
    assert '"error_code":"ClientDisconnected"' in text
    assert "request_crashed" not in text
    assert "Traceback" not in text
    assert broker.sts.emulator.calls == []


async def test_configured_timeouts_reach_the_runner(make_broker: BrokerFactory) -> None:
    """listen.*_seconds become aiohttp's keep-alive and lingering times; defaults are sane."""
    from broker.http.app import runner_options

    broker = await make_broker()
    listen = broker.services.settings.listen
    assert (listen.header_timeout_seconds, listen.body_timeout_seconds) == (10.0, 30.0)
    assert runner_options(broker.services)["keepalive_timeout"] == 75.0
    custom = await make_broker(listen={"keepalive_timeout_seconds": 5, "body_timeout_seconds": 2})
    options = runner_options(custom.services)
    assert (options["keepalive_timeout"], options["lingering_time"]) == (5.0, 2.0)
