"""Hostile HTTP input: parser limits, bodies, JSON, paths and queries get a 4xx, never a 5xx.

Through real sockets on 127.0.0.1, and raw bytes where a client library would
refuse to send them.  STS is never called for a refused request.
"""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

import pytest

from tests.conftest import BrokerFactory, BrokerHarness
from tests.wire import (
    PRESIGN,
    bearer_header,
    error_code,
    raw_request,
    raw_status,
    send,
    send_raw,
)

# --- oversized headers and bodies ---


async def test_oversized_header_value_is_refused_before_any_handler(broker: BrokerHarness) -> None:
    """A header line over listen.max_header_bytes is a 400 from the parser; STS is not called."""
    reply = await send_raw(
        broker,
        raw_request(b"/v1/credentials/avatar-upload", bearer_header(), b"X-Pad: " + b"x" * 9000),
    )
    assert raw_status(reply) == 400
    assert broker.sts.emulator.calls == []


async def test_too_many_headers_are_refused(broker: BrokerHarness) -> None:
    """More than 64 header lines is a 400 from the parser; STS is not called."""
    padding = [b"X-Pad-%d: 1" % index for index in range(100)]
    reply = await send_raw(
        broker, raw_request(b"/v1/credentials/avatar-upload", bearer_header(), *padding)
    )
    assert raw_status(reply) == 400
    assert broker.sts.emulator.calls == []


async def test_oversized_request_line_is_refused(broker: BrokerHarness) -> None:
    """A request line over the limit (a huge policy name or query) is a 400, never a 5xx."""
    for target in (b"/v1/credentials/" + b"a" * 9000, b"/v1/policies?x=" + b"a" * 9000):
        assert raw_status(await send_raw(broker, raw_request(target, bearer_header()))) == 400
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        raw_request(b"/v1/credentials/x?access_token=SECRET-TOKEN-1234&pad=" + b"a" * 9000),
        raw_request(b"/v1/policies", b"Authorization: Bearer SECRET-TOKEN-1234" + b"a" * 9000),
    ],
    ids=["query", "header"],
)
async def test_parser_refusal_echoes_no_token(broker: BrokerHarness, request_bytes: bytes) -> None:
    """A refused oversized line carrying a token does not echo the token back."""
    reply = await send_raw(broker, request_bytes)
    assert raw_status(reply) == 400
    assert b"SECRET-TOKEN" not in reply


@pytest.mark.parametrize("path", ["/v1/presign", "/v1/post-policy"])
async def test_oversized_body_is_413(make_broker: BrokerFactory, path: str) -> None:
    """A body over listen.max_body_bytes is 413 RequestTooLarge, sent plainly or chunked."""
    broker = await make_broker(listen={"max_body_bytes": 1024})
    body = json.dumps({**PRESIGN, "key": "avatars/alice/" + "a" * 4000}).encode()
    status, reply = await send(broker, "POST", path, data=body)
    assert (status, error_code(reply)) == (413, "RequestTooLarge")

    async def chunks() -> Any:
        for start in range(0, len(body), 512):
            yield body[start : start + 512]

    async with broker.client.post(path, data=chunks(), headers=broker.auth("alice")) as resp:
        assert resp.status == 413
    assert broker.sts.emulator.calls == []


async def test_compressed_body_is_limited_after_decompression(broker: BrokerHarness) -> None:
    """A gzip bomb under the size limit is cut off at the limit once inflated: 413, not memory."""
    bomb = gzip.compress(b" " * 50_000_000 + json.dumps(PRESIGN).encode())
    assert len(bomb) < 64 * 1024
    reply = await send_raw(
        broker,
        raw_request(
            b"/v1/presign", bearer_header(), b"Content-Encoding: gzip", method=b"POST", body=bomb
        ),
    )
    assert raw_status(reply) == 413
    assert b'"RequestTooLarge"' in reply


async def test_unauthenticated_oversized_body_is_401_unread(make_broker: BrokerFactory) -> None:
    """Without a token the body is never read: 401, whatever its size."""
    broker = await make_broker(listen={"max_body_bytes": 1024})
    body = json.dumps({**PRESIGN, "key": "a" * 4000}).encode()
    status, reply = await send(broker, "POST", "/v1/presign", data=body, caller=None)
    assert (status, error_code(reply)) == (401, "AuthenticationFailed")


# --- malformed JSON and encodings ---


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"{",
        b'{"policy": "avatar-upload",}',
        b'{"policy": "avatar-upload"} trailing',
        b"{'policy': 'avatar-upload'}",
        b'{"policy": "avatar-upload", "key": "avatars/alice/a", "expires_seconds": NaN}',
        b'{"policy": "avatar-upload", "key": "avatars/alice/a", "expires_seconds": Infinity}',
        b'{"policy": "avatar-upload", "key": "avatars/alice/a", "expires_seconds": 1e400}',
        b'{"policy": "avatar-upload", "key": "avatars/alice/a", "expires_seconds": 1'
        + b"0" * 5000
        + b"}",
        b'"a string"',
        b"42",
        b"true",
    ],
)
@pytest.mark.parametrize("path", ["/v1/presign", "/v1/post-policy"])
async def test_malformed_json_is_400(broker: BrokerHarness, path: str, raw: bytes) -> None:
    """Broken, non-object, NaN/Infinity and 5000-digit JSON bodies are 400 RequestInvalid."""
    status, reply = await send(broker, "POST", path, data=raw)
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize("path", ["/v1/presign", "/v1/post-policy"])
async def test_deeply_nested_json_is_400(broker: BrokerHarness, path: str) -> None:
    """A body nested 30000 arrays deep (30 KB, under the size limit) is 400, not 500."""
    status, reply = await send(broker, "POST", path, data=b"[" * 30000 + b"]" * 30000)
    assert (status, error_code(reply)) == (400, "RequestInvalid")


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_undecodable_content_encoding_is_400(broker: BrokerHarness, encoding: bytes) -> None:
    """A body that is not what its Content-Encoding says is a 400, not a 500."""
    body = json.dumps(PRESIGN).encode()
    header = b"Content-Encoding: " + encoding
    reply = await send_raw(
        broker, raw_request(b"/v1/presign", bearer_header(), header, method=b"POST", body=body)
    )
    assert raw_status(reply) == 400


async def test_valid_compressed_body_is_accepted(broker: BrokerHarness) -> None:
    """A correctly deflated body is read like a plain one (the positive control of the above)."""
    body = zlib.compress(json.dumps(PRESIGN).encode())
    header = b"Content-Encoding: deflate"
    reply = await send_raw(
        broker, raw_request(b"/v1/presign", bearer_header(), header, method=b"POST", body=body)
    )
    assert raw_status(reply) == 200


# --- unicode ---


def _presign_raw(fields: bytes) -> bytes:
    """A presign body, as raw bytes, whose ``fields`` replace or extend a good one's."""
    return b'{"policy": "avatar-upload", "content_type": "image/png", ' + fields + b"}"


_KEY_A = b'"key": "avatars/alice/a"'


@pytest.mark.parametrize(
    "raw",
    [
        _presign_raw(b'"key": "avatars/alice/\\ud800"'),
        _presign_raw(b'"key": "avatars/alice/\\udfff.png"'),
        b'{"policy": "avatar-upload\\ud800", "content_type": "image/png", ' + _KEY_A + b"}",
        b'{"policy": "avatar-upload", "content_type": "image/png\\ud800", ' + _KEY_A + b"}",
        _presign_raw(_KEY_A + b', "metadata": {"\\ud800": "x"}'),
        _presign_raw(_KEY_A + b', "metadata": {"a": "\\ud800"}'),
        _presign_raw(_KEY_A + b', "headers": {"x-oss-forbid-overwrite\\ud800": "true"}'),
        # The same surrogate as raw (invalid) UTF-8, an overlong "/" and a stray byte.
        _presign_raw(b'"key": "avatars/alice/\xed\xa0\x80"'),
        _presign_raw(b'"key": "avatars/alice/\xc0\xaf"'),
        _presign_raw(b'"key": "avatars/alice\xc0\xafx"'),
        _presign_raw(b'"key": "avatars/alice/\xff"'),
        _presign_raw(b'"key": "avatars/alice/a\\u0000b"'),
        _presign_raw(b'"key": "avatars/alice/a\\u0085b"'),
    ],
    ids=[
        "escaped-high-surrogate-key",
        "escaped-low-surrogate-key",
        "surrogate-policy",
        "surrogate-content-type",
        "surrogate-metadata-name",
        "surrogate-metadata-value",
        "surrogate-header-name",
        "raw-surrogate-bytes",
        "overlong-slash",
        "overlong-slash-as-separator",
        "stray-byte",
        "nul",
        "c1-control",
    ],
)
async def test_invalid_unicode_is_400(broker: BrokerHarness, raw: bytes) -> None:
    """Lone surrogates (escaped or raw), overlong UTF-8, NUL and C1 controls: 400, never signed."""
    status, reply = await send(broker, "POST", "/v1/presign", data=raw)
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


# --- policy names in the path ---


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        ("/v1/credentials/..%2Favatar-upload", 400, "RequestInvalid"),
        ("/v1/credentials/..%2favatar-upload", 400, "RequestInvalid"),
        ("/v1/credentials/%2e%2e%2Favatar-upload", 400, "RequestInvalid"),
        ("/v1/credentials/avatar-upload%2F..", 400, "RequestInvalid"),
        ("/v1/credentials/a%2Fb", 400, "RequestInvalid"),
        ("/v1/credentials/%2e%2e", 404, "NotFound"),  # normalized away to /v1
        ("/v1/credentials/avatar-upload%00", 400, "RequestInvalid"),
        ("/v1/credentials/avatar-upload%20", 400, "RequestInvalid"),
        ("/v1/credentials/AVATAR-UPLOAD", 400, "RequestInvalid"),
        ("/v1/credentials/avatar_upload", 400, "RequestInvalid"),
        ("/v1/credentials/-avatar", 400, "RequestInvalid"),
        ("/v1/credentials/avatar%E2%80%8Dupload", 400, "RequestInvalid"),
        ("/v1/credentials/%C3%A0vatar-upload", 400, "RequestInvalid"),
        ("/v1/credentials/" + "a" * 64, 400, "RequestInvalid"),
        ("/v1/credentials/" + "a" * 4000, 400, "RequestInvalid"),
        ("/v1/credentials/" + "a" * 63, 403, "AccessDenied"),
        ("/v1/credentials/", 404, "NotFound"),
    ],
)
async def test_policy_name_traversal_and_length(
    broker: BrokerHarness, path: str, status: int, code: str
) -> None:
    """Encoded traversal, slashes, case, unicode and overlong names never reach a policy or STS."""
    got, reply = await send(broker, "GET", path)
    assert (got, error_code(reply)) == (status, code)
    assert broker.sts.emulator.calls == []


async def test_dot_segments_in_raw_paths_do_not_escape_the_route(broker: BrokerHarness) -> None:
    """Unencoded ../ sent verbatim is normalized before routing: a JSON 404, never a policy."""
    target = b"/v1/credentials/../credentials/..%2F..%2Fpolicies"
    reply = await send_raw(broker, raw_request(target, bearer_header()))
    assert raw_status(reply) == 404
    assert b'"NotFound"' in reply
    assert broker.sts.emulator.calls == []


async def test_policy_name_with_trailing_newline_is_400(broker: BrokerHarness) -> None:
    """/v1/credentials/avatar-upload%0A is malformed (400), like the same name in a body."""
    status, reply = await send(broker, "GET", "/v1/credentials/avatar-upload%0A")
    assert (status, error_code(reply)) == (400, "RequestInvalid")


# --- min_ttl_seconds ---


@pytest.mark.parametrize(
    "query",
    ["-1", "1e3", "0x10", "+5", " 5", "5 ", "", "1.0", "true", "99999999999999999999999", "841"],
)
async def test_bad_min_ttl_is_400(broker: BrokerHarness, query: str) -> None:
    """min_ttl_seconds that is not a whole number within duration - margin is 400 before STS."""
    status, reply = await send(
        broker, "GET", f"/v1/credentials/avatar-upload?min_ttl_seconds={query}"
    )
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert reply["StatusCode"] == 400
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "query", ["%C2%B2", "%D9%A1%D9%A2", "%EF%BC%95"], ids=["sup2", "arabic12", "fullwidth5"]
)
async def test_non_ascii_digits_in_min_ttl_are_400(broker: BrokerHarness, query: str) -> None:
    """Only ASCII digits make a min_ttl_seconds: superscript, Arabic-Indic, fullwidth are 400."""
    status, reply = await send(
        broker, "GET", f"/v1/credentials/avatar-upload?min_ttl_seconds={query}"
    )
    assert (status, error_code(reply)) == (400, "RequestInvalid")


@pytest.mark.parametrize(
    "query",
    ["min_ttl_seconds=0&min_ttl_seconds=0", "min_ttl_seconds=0&min_ttl_seconds=60"],
)
async def test_duplicate_query_parameters_are_400(broker: BrokerHarness, query: str) -> None:
    """min_ttl_seconds given twice is 400 RequestInvalid, before STS."""
    status, reply = await send(broker, "GET", f"/v1/credentials/avatar-upload?{query}")
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


# --- CR, LF and NUL in headers ---


@pytest.mark.parametrize(
    "request_id",
    [b"abcdefgh%0d%0aSet-Cookie:%20a=b", b"abcdefgh\\r\\nSet-Cookie: a=b", b"abcdefgh\tx"],
)
async def test_request_id_with_crlf_is_replaced(broker: BrokerHarness, request_id: bytes) -> None:
    """An X-Request-Id carrying (encoded) CR/LF is not echoed: a fresh id, no injected header."""
    reply = await send_raw(broker, raw_request(b"/healthz", b"X-Request-Id: " + request_id))
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert raw_status(reply) == 200
    assert b"set-cookie" not in head
    assert request_id.lower() not in head


@pytest.mark.parametrize(
    "header",
    [b"X-Request-Id: abcdefgh\rSet-Cookie: a=b", b"Authorization: Bearer a\rb", b"X-A: \x00"],
)
async def test_bare_cr_or_nul_in_headers_is_refused_by_the_parser(
    broker: BrokerHarness, header: bytes
) -> None:
    """A bare CR or NUL inside a header line is a parser 400; nothing is injected."""
    reply = await send_raw(broker, raw_request(b"/v1/credentials/avatar-upload", header))
    assert raw_status(reply) == 400
    assert b"set-cookie" not in reply.split(b"\r\n\r\n", 1)[0].lower()
    assert broker.sts.emulator.calls == []


# --- duplicates and methods ---


@pytest.mark.parametrize(
    "raw",
    [
        b'{"policy": "avatar-upload", "policy": "service-uploads", "key": "avatars/alice/a"}',
        b'{"policy": "avatar-upload", "key": "avatars/alice/a", "key": "avatars/bob/a"}',
        b'{"policy": "avatar-upload", "key": "avatars/alice/a", "content_type": "image/png",'
        b' "metadata": {"a": "1", "a": "2"}}',
        b'{"policy": "avatar-upload", "key": "avatars/alice/a", "content_type": "image/png",'
        b' "callback": {"url": "u", "url": "v", "body": "b"}}',
    ],
)
async def test_duplicate_json_keys_are_400_at_any_depth(broker: BrokerHarness, raw: bytes) -> None:
    """A JSON object that repeats a field, top level or nested, is 400 RequestInvalid."""
    status, reply = await send(broker, "POST", "/v1/presign", data=raw)
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


async def test_405_lists_the_allowed_methods(broker: BrokerHarness) -> None:
    """POST /v1/policies is 405 MethodNotAllowed with an Allow header naming GET."""
    async with broker.client.post("/v1/policies", headers=broker.auth("alice")) as resp:
        assert resp.status == 405
        assert "GET" in resp.headers.get("Allow", "")
