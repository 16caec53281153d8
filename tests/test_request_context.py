"""The request context (broker/request_context.py): what log lines of a request carry.

Through the real chain (``configure_logging`` to a StringIO) and through HTTP
on 127.0.0.1: a request's lines carry its id, caller and policy; a line's own
field wins; outside a request nothing is added; requests on one keep-alive
connection share nothing; a client's secret-shaped request id is echoed but
never logged; a worker's bound index reaches the request lines.
"""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import aiohttp
import pytest
import structlog

from broker import request_context
from broker.logs import REDACTED, configure_logging
from broker.models import Principal
from tests.conftest import CALLERS, BrokerFactory, BrokerHarness

T = TypeVar("T")

REQUEST_ID = "0123456789abcdef0123456789abcdef"
# A client-chosen X-Request-Id that is one of our API keys (sk_ + upper and lower case):
# it passes names.REQUEST_ID ([A-Za-z0-9._-]{8,64}), so it is echoed, but it is a secret.
SECRET_ID = "sk_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789"
PLAIN_ID = "client-req-0001"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging configured as JSON at debug into a StringIO; reset after."""
    output = io.StringIO()
    configure_logging("json", "debug", stream=output)
    yield output
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _lines(output: io.StringIO, event: str | None = None) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in output.getvalue().splitlines()]
    return [line for line in lines if event is None or line["event"] == event]


def _isolated(function: Callable[[], T]) -> T:
    """Run ``function`` in a new, empty context (as a fresh task would be), leaving ours alone."""
    return contextvars.Context().run(function)


def _log_in_request(**fields: Any) -> None:
    request_context.begin(REQUEST_ID, "credentials", "127.0.0.1")
    request_context.note_caller(Principal("svc-a"))
    request_context.note_policy("reports-read")
    structlog.get_logger("broker.test").info("something_happened", **fields)
    logging.getLogger("aiohttp.test").warning("from the standard library")


def test_lines_in_a_request_carry_its_id_caller_and_policy(stream: io.StringIO) -> None:
    """structlog and stdlib lines logged during a request carry request_id, caller, policy."""
    _isolated(_log_in_request)
    ours, stdlib = _lines(stream)
    for line in (ours, stdlib):
        assert (line["request_id"], line["caller"], line["policy"]) == (
            REQUEST_ID,
            "svc-a",
            "reports-read",
        )
    assert ours["event"] == "something_happened"
    assert stdlib["event"] == "from the standard library"


def test_a_lines_own_field_wins(stream: io.StringIO) -> None:
    """A field the line sets itself (request_id, caller, policy) is kept over the context's."""
    _isolated(lambda: _log_in_request(request_id="mine", caller="explicit", policy="other"))
    ours, stdlib = _lines(stream)
    assert (ours["request_id"], ours["caller"], ours["policy"]) == ("mine", "explicit", "other")
    assert (stdlib["caller"], stdlib["policy"]) == ("svc-a", "reports-read")


def test_before_the_caller_is_known_a_line_has_only_the_id(stream: io.StringIO) -> None:
    """A request not yet authenticated adds its request_id and no caller or policy."""

    def log() -> None:
        request_context.begin(REQUEST_ID, None, None)
        structlog.get_logger("broker.test").info("early")

    _isolated(log)
    (line,) = _lines(stream)
    assert line["request_id"] == REQUEST_ID
    assert "caller" not in line
    assert "policy" not in line


def test_outside_a_request_nothing_is_added_and_notes_are_no_ops(stream: io.StringIO) -> None:
    """Without begin(), note_caller/note_policy change nothing and lines get no request fields."""

    def log() -> request_context.RequestContext:
        request_context.note_caller(Principal("svc-a"))
        request_context.note_policy("reports-read")
        structlog.get_logger("broker.test").info("at_startup")
        return request_context.current()

    outside = _isolated(log)
    assert (outside.request_id, outside.principal, outside.policy) == (None, None, None)
    assert _isolated(request_context.current) == request_context.RequestContext()
    (line,) = _lines(stream)
    assert not {"request_id", "caller", "policy"} & line.keys()


def test_a_new_request_in_the_same_context_starts_empty(stream: io.StringIO) -> None:
    """begin() of the next request (same task, as on one connection) drops caller and policy."""

    def two_requests() -> None:
        _log_in_request()
        request_context.begin("fedcba9876543210", "healthz", "127.0.0.1")
        structlog.get_logger("broker.test").info("second")

    _isolated(two_requests)
    second = _lines(stream, "second")[0]
    assert second["request_id"] == "fedcba9876543210"
    assert "caller" not in second
    assert "policy" not in second


async def test_keep_alive_requests_do_not_share_caller_or_policy(
    broker: BrokerHarness, stream: io.StringIO
) -> None:
    """On one connection, an authenticated request's caller/policy never reach the next lines."""
    created: list[object] = []

    async def on_created(*_: object) -> None:
        created.append(object())

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_created)
    connector = aiohttp.TCPConnector(limit=1)
    ids = []
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        for path, headers in [
            ("/v1/credentials/service-uploads", broker.auth("svc-a")),
            ("/healthz", {}),
            ("/v1/policies", {}),
        ]:
            async with session.get(broker.client.make_url(path), headers=headers) as resp:
                await resp.read()
                ids.append((resp.status, resp.headers["X-Request-Id"]))
    assert len(created) == 1  # the three requests went over one connection
    assert [status for status, _ in ids] == [200, 200, 401]
    first, second, third = _lines(stream, "request_finished")
    assert [line["request_id"] for line in (first, second, third)] == [i for _, i in ids]
    assert (first["caller"], first["policy"]) == ("svc-a", "service-uploads")
    for line in (second, third):
        assert "caller" not in line
        assert "policy" not in line


@pytest.mark.parametrize("caller", ["svc-a", "nobody"], ids=["served", "revoked"])
async def test_a_secret_shaped_request_id_is_echoed_but_never_logged(
    make_broker: BrokerFactory, stream: io.StringIO, caller: str
) -> None:
    """An sk_... X-Request-Id comes back in the reply; every log line shows it scrubbed."""
    broker = await make_broker(auth={"revoked": {"callers": ["nobody"]}})
    headers = {**broker.auth(caller), "X-Request-Id": SECRET_ID}
    async with broker.client.get("/v1/credentials/service-uploads", headers=headers) as resp:
        assert resp.headers["X-Request-Id"] == SECRET_ID
        await resp.read()
    assert SECRET_ID not in stream.getvalue()
    lines = _lines(stream)
    logged = {line["event"] for line in lines if "request_id" in line}
    expected = {"request_finished"}
    expected |= {"credentials_issued"} if caller == "svc-a" else {"caller_revoked"}
    assert expected <= logged  # the hot lines and, when revoked, a structlog chain line
    for line in lines:
        if "request_id" in line:
            assert REDACTED in line["request_id"]
            assert line["caller"] == caller


async def test_a_plain_client_request_id_is_logged_as_sent(
    broker: BrokerHarness, stream: io.StringIO
) -> None:
    """A client X-Request-Id with no secret shape is echoed and logged verbatim."""
    headers = {**broker.auth("svc-a"), "X-Request-Id": PLAIN_ID}
    async with broker.client.get("/v1/credentials/service-uploads", headers=headers) as resp:
        assert (resp.status, resp.headers["X-Request-Id"]) == (200, PLAIN_ID)
    lines = _lines(stream)
    assert {line["event"] for line in lines} >= {"request_finished", "credentials_issued"}
    assert {line.get("request_id") for line in lines} == {PLAIN_ID}


async def test_a_worker_index_bound_before_serving_reaches_request_lines(
    make_broker: BrokerFactory, stream: io.StringIO
) -> None:
    """bind_contextvars(worker=0) before the server starts: every request line carries worker 0."""
    structlog.contextvars.bind_contextvars(worker=0)
    try:
        broker = await make_broker()
        status, _ = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
        assert status == 200
        status, _ = await broker.get_json("/v1/policies", caller=None)
        assert status == 401
    finally:
        structlog.contextvars.unbind_contextvars("worker")
    lines = _lines(stream)
    events = [line["event"] for line in lines]
    assert events.count("request_finished") == 2
    assert "credentials_issued" in events
    for line in lines:
        if "request_id" in line:
            assert line["worker"] == 0
    assert CALLERS["svc-a"][0] not in stream.getvalue()
