"""The hot lines' direct renderer (broker/hot_log.py): structlog's line, its guards, its writer.

``emit`` must write exactly the JSON object structlog's chain writes for the
same event (bound context, level, timestamp format), with the same key
redaction and line scrub, through the same writer, at the same level; and
step aside for structlog whenever the chain is not the JSON one
``configure_logging`` installed.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import dataclasses
import io
import json
import logging
import re
import secrets
from collections.abc import Iterator
from typing import Any

import pytest
import structlog
from structlog.testing import capture_logs

from broker import hot_log, logs, request_context
from broker.auth import generate_api_key
from broker.logs import REDACTED, configure_logging, render_json, scrub_text
from broker.models import Principal
from tests.conftest import CALLERS, BrokerHarness

ISO_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{6})?Z")
API_KEY = generate_api_key()
STS_TOKEN = "CAIS" + base64.b64encode(secrets.token_bytes(120)).decode()
STS_SECRET = "wyLTSmsyPGP1ohvvw8xYgB29dlGI8KMiH2pKCNZ9"
SIGNATURE = "c2lnbmF0dXJlLWNhbmFyeQ%3D%3D"


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    """Logging configured as JSON at debug into a StringIO, a request_id bound; reset after."""
    output = io.StringIO()
    configure_logging("json", "debug", stream=output)
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id="0123456789abcdef0123456789abcdef")
    yield output
    structlog.contextvars.clear_contextvars()
    structlog.reset_defaults()
    logging.getLogger().handlers.clear()


def _lines(output: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in output.getvalue().splitlines()]


def _fields() -> dict[str, Any]:
    return {
        "method": "GET",
        "path": "/v1/credentials/reports-read",
        "status": 200,
        "duration_ms": 0.412,
        "error_code": None,
        "nested": {"security_token": "s1", "ok": ["a", ("b", 1)]},
        "note": f"Signature={SIGNATURE} and {API_KEY}",
    }


def test_fast_line_is_the_chains_line(stream: io.StringIO) -> None:
    """The same event and fields give the same JSON object through emit as through structlog."""
    structlog.get_logger("broker.http").info("request_finished", **_fields())
    hot_log.emit("request_finished", _fields())
    chain, fast = _lines(stream)
    assert list(fast) == list(chain)  # same keys, in the same order
    assert ISO_UTC.fullmatch(chain.pop("timestamp"))
    assert ISO_UTC.fullmatch(fast.pop("timestamp"))
    assert fast == chain
    assert fast["nested"]["security_token"] == REDACTED
    assert fast["request_id"] == "0123456789abcdef0123456789abcdef"
    assert fast["level"] == "info"


def test_secret_named_fields_are_redacted(stream: io.StringIO) -> None:
    """A secret-named field, at the top or nested, is written as [redacted]."""
    fields = {"AccessKeySecret": "plain-s1", "grants": [{"x-oss-signature": "plain-s2"}]}
    hot_log.emit("credentials_issued", fields)
    text = stream.getvalue()
    assert "plain-s1" not in text
    assert "plain-s2" not in text
    (line,) = _lines(stream)
    assert line["AccessKeySecret"] == REDACTED
    assert line["grants"] == [{"x-oss-signature": REDACTED}]


def test_canaries_in_values_are_scrubbed(stream: io.StringIO) -> None:
    """An API key, an STS token and secret, a URL signature in any value never reach the line."""
    fields = {
        "path": f"/v1/x/{API_KEY}",
        "cache": STS_TOKEN,
        "bucket": f"quoting {STS_SECRET} alone",
        "key": f"https://b.oss/k?OSSAccessKeyId=LTAI&Signature={SIGNATURE}&Expires=1",
    }
    hot_log.emit("url_presigned", fields)
    text = stream.getvalue()
    for canary in (API_KEY, STS_TOKEN, STS_SECRET, SIGNATURE):
        assert canary not in text
    assert text.count(REDACTED) == 4
    assert _lines(stream)[0]["event"] == "url_presigned"


@pytest.mark.parametrize(
    "value",
    [
        f"/v1/x?access_token={API_KEY}",
        f"Bearer {API_KEY}",
        f"line one\n{STS_TOKEN}\tand {STS_SECRET}",
        f'quoted "{SIGNATURE}" x-oss-signature={SIGNATURE}',
        f"caf\u00e9 {STS_SECRET}",
        "STS.NUnJbJ3bExampleKeyId",
    ],
)
def test_values_scrubbed_one_by_one_read_as_the_whole_line_would(
    stream: io.StringIO, value: str
) -> None:
    """Scrubbing each value alone gives the line scrubbing the whole rendered line gives."""
    hot_log.emit("request_finished", {"path": value, "status": 200})
    (line,) = _lines(stream)
    whole = json.loads(scrub_text(render_json({"path": value})))
    assert line["path"] == whole["path"]


def test_a_key_read_as_a_secrets_name_takes_the_whole_line_scrub(stream: io.StringIO) -> None:
    """A field such as id_token is masked as the whole-line scrub masks it (no shortcut)."""
    hot_log.emit("request_finished", {"id_token": "opaque-but-secret", "status": 200})
    (line,) = _lines(stream)
    assert "opaque-but-secret" not in stream.getvalue()
    assert line["status"] == 200


def test_warning_level_writes_nothing() -> None:
    """At level warning the hot (info) events write nothing, as structlog's filter would."""
    output = io.StringIO()
    configure_logging("json", "warning", stream=output)
    try:
        hot_log.emit("request_finished", _fields())
        hot_log.emit("credentials_issued", {"bucket": "b"})
        structlog.get_logger("x").warning("kept")
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    assert [line["event"] for line in _lines(output)] == ["kept"]


def test_bound_context_is_merged_and_fields_win(stream: io.StringIO) -> None:
    """Bound contextvars (request_id, caller) are on the line; a field of the same name wins."""
    structlog.contextvars.bind_contextvars(caller="alice", policy="from-context")
    hot_log.emit("post_policy_signed", {"policy": "from-field"})
    structlog.contextvars.unbind_contextvars("caller")
    hot_log.emit("post_policy_signed", {})
    first, second = _lines(stream)
    assert first["caller"] == "alice"
    assert first["policy"] == "from-field"
    assert first["request_id"] == "0123456789abcdef0123456789abcdef"
    assert "caller" not in second
    assert second["policy"] == "from-context"


def test_context_reader_agrees_with_structlogs_public_one(
    stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The bound context read from structlog's own variables equals get_contextvars()."""
    structlog.contextvars.bind_contextvars(caller="alice", worker=2)
    structlog.contextvars.unbind_contextvars("worker")
    expected = {"request_id": "0123456789abcdef0123456789abcdef", "caller": "alice"}
    assert hot_log._bound_context() == structlog.contextvars.get_contextvars() == expected
    monkeypatch.delattr(structlog.contextvars, "_CONTEXT_VARS")
    assert hot_log._structlog_context()() == expected  # a structlog without it: the public call


def test_background_lines_go_through_the_sink() -> None:
    """With the daemon's LogSink, lines from the loop and from outside it are written once each."""
    output = io.StringIO()
    sink = configure_logging("json", "info", stream=output, background=True)
    assert sink is not None

    async def in_loop() -> None:
        hot_log.emit("request_finished", {"status": 200})
        hot_log.emit("credentials_issued", {"cache": "hit"})

    try:
        asyncio.run(in_loop())
        hot_log.emit("url_presigned", {"key": "k"})
        assert sink.flush(20.0)
    finally:
        sink.close()
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    events = [line["event"] for line in _lines(output)]
    assert events == ["request_finished", "credentials_issued", "url_presigned"]


def test_console_output_goes_through_structlog_scrubbed() -> None:
    """On the console renderer the line is structlog's own, still scrubbed."""
    output = io.StringIO()
    configure_logging("console", "info", stream=output)
    try:
        hot_log.emit("request_finished", {"path": f"/p/{API_KEY}", "status": 200})
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    text = output.getvalue()
    assert "request_finished" in text
    assert not text.startswith("{")
    assert API_KEY not in text


def test_reconfigured_structlog_takes_the_lines_back(stream: io.StringIO) -> None:
    """capture_logs sees the hot events; after reset_defaults nothing goes to the old stream."""
    with capture_logs() as captured:
        hot_log.emit("credentials_issued", {"cache": "miss"})
    assert [entry["event"] for entry in captured] == ["credentials_issued"]
    assert captured[0]["cache"] == "miss"
    hot_log.emit("request_finished", {"status": 200})  # the route holds again
    structlog.reset_defaults()
    hot_log.emit("request_finished", {"status": 201})  # structlog's defaults: stdout
    assert [line["status"] for line in _lines(stream)] == [200]


async def test_real_requests_write_their_hot_lines_directly(
    broker: BrokerHarness, stream: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credentials request writes request_finished and credentials_issued via emit, no secret."""
    route = logs.hot_route()
    assert route is not None
    direct: list[str] = []

    def write(line: str) -> None:
        direct.append(line)
        route.write(line)

    monkeypatch.setattr(logs, "_ROUTE", [dataclasses.replace(route, write=write)])
    status, body = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert status == 200
    events = [json.loads(line) for line in direct]
    assert [event["event"] for event in events] == ["credentials_issued", "request_finished"]
    assert {event["caller"] for event in events} == {"svc-a"}
    assert len({event["request_id"] for event in events}) == 1
    text = stream.getvalue()
    for canary in (body["AccessKeySecret"], body["SecurityToken"], CALLERS["svc-a"][0]):
        assert canary not in text


# --- emit(event, fields, varying): the memoised prefix (issue 14) ---


@pytest.fixture
def prefixes(monkeypatch: pytest.MonkeyPatch) -> dict[Any, str]:
    """An empty prefix memo for this test (the module's own is restored after)."""
    memo: dict[Any, str] = {}
    monkeypatch.setattr(hot_log, "_PREFIXES", memo)
    return memo


def _timeless(line: dict[str, Any]) -> dict[str, Any]:
    assert ISO_UTC.fullmatch(line.pop("timestamp"))
    return line


def _repeating() -> dict[str, Any]:
    return {"method": "GET", "path": "/v1/credentials/reports-read", "status": 200}


def _chain_and_emit(fields: dict[str, Any], varying: dict[str, Any]) -> None:
    """The same event through structlog's chain, then twice through emit (memo cold, then warm)."""
    structlog.get_logger("broker.http").info("request_finished", **fields, **varying)
    hot_log.emit("request_finished", dict(fields), dict(varying))
    hot_log.emit("request_finished", dict(fields), dict(varying))


def _in_request() -> None:
    request_context.begin("fedcba9876543210fedcba9876543210", "credentials", "127.0.0.1")
    request_context.note_caller(Principal("svc-a"))
    request_context.note_policy("reports-read")
    _chain_and_emit(_repeating() | {"error_code": None}, {"duration_ms": 0.5, "hit": True})


def test_a_varying_line_is_the_chains_line(stream: io.StringIO, prefixes: dict[Any, str]) -> None:
    """With varying fields, emit's lines (cold and memoised) parse to the chain's JSON object."""
    _chain_and_emit(_repeating() | {"error_code": None}, {"duration_ms": 0.412, "n": 3})
    chain, cold, warm = (_timeless(line) for line in _lines(stream))
    assert cold == warm == chain
    assert chain["request_id"] == "0123456789abcdef0123456789abcdef"
    assert (chain["duration_ms"], chain["n"], chain["level"]) == (0.412, 3, "info")
    assert len(prefixes) == 1


def test_a_varying_line_in_a_request_is_the_chains_line(
    stream: io.StringIO, prefixes: dict[Any, str]
) -> None:
    """In a request, emit's line carries the chain's request_id, caller and policy, same object."""
    contextvars.Context().run(_in_request)  # a task's own context: no structlog binding
    chain, cold, warm = (_timeless(line) for line in _lines(stream))
    assert cold == warm == chain
    assert (chain["request_id"], chain["caller"], chain["policy"]) == (
        "fedcba9876543210fedcba9876543210",
        "svc-a",
        "reports-read",
    )
    assert len(prefixes) == 1


def test_a_canary_in_a_repeating_field_is_scrubbed_on_every_line(
    stream: io.StringIO, prefixes: dict[Any, str]
) -> None:
    """An API key and a signature in repeating fields are masked on the first and memoised line."""
    fields = {"path": f"/v1/x/{API_KEY}", "status": 200, "note": f"Signature={SIGNATURE}"}
    for duration in (1.0, 2.0):
        hot_log.emit("request_finished", dict(fields), {"duration_ms": duration})
    text = stream.getvalue()
    assert API_KEY not in text
    assert SIGNATURE not in text
    assert API_KEY not in "".join(prefixes.values())
    first, second = _lines(stream)
    whole = json.loads(scrub_text(render_json(fields)))
    for line, duration in ((first, 1.0), (second, 2.0)):
        assert (line["path"], line["note"]) == (whole["path"], whole["note"])
        assert line["duration_ms"] == duration
    assert len(prefixes) == 1


def test_a_string_in_varying_takes_the_general_way_scrubbed(
    stream: io.StringIO, prefixes: dict[Any, str]
) -> None:
    """A varying string is not templated: no prefix is kept, the line is the chain's, scrubbed."""
    _chain_and_emit(_repeating(), {"duration_ms": 1.0, "note": f"Bearer {API_KEY}"})
    assert API_KEY not in stream.getvalue()
    chain, cold, warm = (_timeless(line) for line in _lines(stream))
    assert cold == warm == chain
    assert REDACTED in chain["note"]
    assert prefixes == {}


def test_an_unhashable_field_still_writes_a_correct_line(
    stream: io.StringIO, prefixes: dict[Any, str]
) -> None:
    """A list or dict in fields (no template possible) gives the chain's line, redacted."""
    fields = {"grants": ["a", ("b", 1)], "nested": {"security_token": "plain-s1"}, "status": 200}
    _chain_and_emit(fields, {"duration_ms": 1.5})
    assert "plain-s1" not in stream.getvalue()
    chain, cold, warm = (_timeless(line) for line in _lines(stream))
    assert cold == warm == chain
    assert (cold["grants"], cold["nested"]) == (["a", ["b", 1]], {"security_token": REDACTED})
    assert cold["duration_ms"] == 1.5
    assert prefixes == {}


def test_the_prefix_memo_is_bounded_and_starts_over(
    stream: io.StringIO, prefixes: dict[Any, str]
) -> None:
    """Past _MAX_PREFIXES distinct lines the memo is emptied and refilled; lines stay right."""
    bound = hot_log._MAX_PREFIXES
    for index in range(bound):
        hot_log.emit("request_finished", {"path": f"/p/{index}"}, {"duration_ms": 1.0})
    assert len(prefixes) == bound
    hot_log.emit("request_finished", {"path": "/past-the-bound"}, {"duration_ms": 2.0})
    assert len(prefixes) == 1
    hot_log.emit("request_finished", {"path": "/p/0"}, {"duration_ms": 3.0})
    assert len(prefixes) == 2
    lines = _lines(stream)
    assert len(lines) == bound + 2
    assert [(line["path"], line["duration_ms"]) for line in lines[-2:]] == [
        ("/past-the-bound", 2.0),
        ("/p/0", 3.0),
    ]
    assert _timeless(lines[-1]) == {
        "path": "/p/0",
        "event": "request_finished",
        "request_id": "0123456789abcdef0123456789abcdef",
        "level": "info",
        "duration_ms": 3.0,
    }


def test_a_secret_named_field_with_varying_is_redacted(
    stream: io.StringIO, prefixes: dict[Any, str]
) -> None:
    """id_token and access_token fields are masked on every line, as the chain masks them."""
    fields = {"id_token": "opaque-but-secret", "access_token": "plain-at", "status": 200}
    _chain_and_emit(fields, {"duration_ms": 1.0})
    text = stream.getvalue()
    assert "opaque-but-secret" not in text
    assert "plain-at" not in text
    chain, cold, warm = (_timeless(line) for line in _lines(stream))
    assert cold == warm == chain
    assert cold["access_token"] == REDACTED
    assert (cold["status"], cold["duration_ms"]) == (200, 1.0)
    assert "opaque-but-secret" not in "".join(prefixes.values())


def test_an_empty_varying_writes_the_chains_line(
    stream: io.StringIO, prefixes: dict[Any, str]
) -> None:
    """emit with varying={} writes a JSON line equal to the chain's (as varying=None does)."""
    _chain_and_emit(_repeating(), {})
    chain, cold, warm = (_timeless(line) for line in _lines(stream))
    assert cold == warm == chain


def _started_line(fields: dict[str, Any], varying: dict[str, Any]) -> None:
    """In a request: emit's line, then the same line from ``line_start`` + ``finish``."""
    request_context.begin("fedcba9876543210fedcba9876543210", "credentials", "127.0.0.1")
    request_context.note_caller(Principal("svc-a"))
    request_context.note_policy("reports-read")
    hot_log.emit("request_finished", dict(fields), dict(varying))
    found = hot_log.line_route()
    assert found is not None
    route, bound = found
    start = hot_log.line_start("request_finished", dict(fields), bound)
    assert start
    context = request_context.current()
    hot_log.finish(route, start, hot_log.varying_json(varying), bound, context)


def test_a_line_from_its_kept_start_is_emits_line(stream: io.StringIO) -> None:
    """``line_start`` + ``finish`` write emit's line, byte for byte but the timestamp."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(worker=1)
    contextvars.copy_context().run(_started_line, _repeating() | {"error_code": None}, {"d": 0.5})
    emitted, started = stream.getvalue().splitlines()
    stamp = re.compile(r'"timestamp":"[^"]+"')
    assert stamp.sub("", emitted) == stamp.sub("", started)
    assert json.loads(started)["worker"] == 1


def test_a_canary_in_a_kept_start_is_scrubbed(stream: io.StringIO) -> None:
    """A secret shape in a repeating field is scrubbed in the start, as in emit's line."""
    fields = _repeating() | {"path": f"/v1/credentials/{API_KEY}", "error_code": None}
    contextvars.Context().run(_started_line, fields, {"d": 1})
    assert API_KEY not in stream.getvalue()
    assert len(stream.getvalue().splitlines()) == 2


def test_no_line_route_when_lines_are_not_written_here() -> None:
    """Console output or info off: ``line_route`` is None (callers then use ``emit``)."""
    for fmt, level in (("console", "info"), ("json", "warning")):
        configure_logging(fmt, level, stream=io.StringIO())
        try:
            assert hot_log.line_route() is None
        finally:
            structlog.reset_defaults()
            logging.getLogger().handlers.clear()
