"""Hostile input: every bad request gets a 4xx with a stable code, never a 5xx, never STS.

Through real sockets on 127.0.0.1 (and raw bytes where a client library would
refuse to send them), plus Hypothesis properties of the pure rules behind the
HTTP layer: ``check_key`` and ``clamp_expiry``.

"""

from __future__ import annotations

import asyncio
import functools
import gzip
import json
import math
import shutil
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.config import load_settings
from broker.errors import AccessDenied, ConfigError, RequestInvalid
from broker.policies import Policy, load_policies
from broker.signing import MAX_EXPIRES_SECONDS
from broker.uploads import MAX_KEY_BYTES, check_key, clamp_expiry
from tests.conftest import CALLERS, POLICIES_DIR, BrokerFactory, BrokerHarness, write_jwks

PRESIGN = {"policy": "avatar-upload", "key": "avatars/alice/me.png", "content_type": "image/png"}
POST_POLICY = {"policy": "avatar-upload", "content_type": "image/png"}
ALICE_KEY = CALLERS["alice"][0]
_BOUNDED = settings(max_examples=200, deadline=None, database=None)


async def _send(
    broker: BrokerHarness,
    method: str,
    path: str,
    *,
    data: bytes | None = None,
    caller: str | None = "alice",
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """Send one request; the status and the JSON reply (or the text, if it is not JSON)."""
    sent = {**(broker.auth(caller) if caller else {}), **(headers or {})}
    async with broker.client.request(method, path, data=data, headers=sent) as resp:
        text = await resp.text()
        try:
            return resp.status, json.loads(text)
        except ValueError:
            return resp.status, text


async def _post(
    broker: BrokerHarness, path: str, body: Any, caller: str = "alice"
) -> tuple[int, Any]:
    return await _send(broker, "POST", path, data=json.dumps(body).encode(), caller=caller)


async def _raw(broker: BrokerHarness, request: bytes) -> bytes:
    """Write ``request`` verbatim to the broker's socket and read the reply to EOF."""
    reader, writer = await asyncio.open_connection(broker.client.host, broker.client.port)
    try:
        writer.write(request)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout=10)
    finally:
        writer.close()
        await writer.wait_closed()


def _request(target: bytes, *headers: bytes, method: bytes = b"GET", body: bytes = b"") -> bytes:
    lines = [method + b" " + target + b" HTTP/1.1", b"Host: 127.0.0.1", *headers]
    if body:
        lines.append(b"Content-Length: %d" % len(body))
    return b"\r\n".join([*lines, b"Connection: close", b"", b""]) + body


def _status(reply: bytes) -> int:
    return int(reply.split(b" ", 2)[1])


def _code(reply: Any) -> str:
    assert isinstance(reply, dict), reply
    code: str = reply["error"]["code"]
    return code


def _bearer() -> bytes:
    return b"Authorization: Bearer " + ALICE_KEY.encode()


# --- oversized headers and bodies ---


async def test_oversized_header_value_is_refused_before_any_handler(broker: BrokerHarness) -> None:
    """A header line over listen.max_header_bytes is a 400 from the parser; STS is not called."""
    reply = await _raw(
        broker, _request(b"/v1/credentials/avatar-upload", _bearer(), b"X-Pad: " + b"x" * 9000)
    )
    assert _status(reply) == 400
    assert broker.sts.emulator.calls == []


async def test_too_many_headers_are_refused(broker: BrokerHarness) -> None:
    """More than 64 header lines is a 400 from the parser; STS is not called."""
    padding = [b"X-Pad-%d: 1" % index for index in range(100)]
    reply = await _raw(broker, _request(b"/v1/credentials/avatar-upload", _bearer(), *padding))
    assert _status(reply) == 400
    assert broker.sts.emulator.calls == []


async def test_oversized_request_line_is_refused(broker: BrokerHarness) -> None:
    """A request line over the limit (a huge policy name or query) is a 400, never a 5xx."""
    for target in (b"/v1/credentials/" + b"a" * 9000, b"/v1/policies?x=" + b"a" * 9000):
        assert _status(await _raw(broker, _request(target, _bearer()))) == 400
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "request_bytes",
    [
        _request(b"/v1/credentials/x?access_token=SECRET-TOKEN-1234&pad=" + b"a" * 9000),
        _request(b"/v1/policies", b"Authorization: Bearer SECRET-TOKEN-1234" + b"a" * 9000),
    ],
    ids=["query", "header"],
)
async def test_parser_refusal_echoes_no_token(broker: BrokerHarness, request_bytes: bytes) -> None:
    """A refused oversized line carrying a token does not echo the token back."""
    reply = await _raw(broker, request_bytes)
    assert _status(reply) == 400
    assert b"SECRET-TOKEN" not in reply


@pytest.mark.parametrize("path", ["/v1/presign", "/v1/post-policy"])
async def test_oversized_body_is_413(make_broker: BrokerFactory, path: str) -> None:
    """A body over listen.max_body_bytes is 413 RequestTooLarge, sent plainly or chunked."""
    broker = await make_broker(listen={"max_body_bytes": 1024})
    body = json.dumps({**PRESIGN, "key": "avatars/alice/" + "a" * 4000}).encode()
    status, reply = await _send(broker, "POST", path, data=body)
    assert (status, _code(reply)) == (413, "RequestTooLarge")

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
    reply = await _raw(
        broker,
        _request(b"/v1/presign", _bearer(), b"Content-Encoding: gzip", method=b"POST", body=bomb),
    )
    assert _status(reply) == 413
    assert b'"RequestTooLarge"' in reply


async def test_unauthenticated_oversized_body_is_401_unread(make_broker: BrokerFactory) -> None:
    """Without a token the body is never read: 401, whatever its size."""
    broker = await make_broker(listen={"max_body_bytes": 1024})
    body = json.dumps({**PRESIGN, "key": "a" * 4000}).encode()
    status, reply = await _send(broker, "POST", "/v1/presign", data=body, caller=None)
    assert (status, _code(reply)) == (401, "AuthenticationFailed")


# --- malformed JSON and wrong types ---


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
    status, reply = await _send(broker, "POST", path, data=raw)
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize("path", ["/v1/presign", "/v1/post-policy"])
async def test_deeply_nested_json_is_400(broker: BrokerHarness, path: str) -> None:
    """A body nested 30000 arrays deep (30 KB, under the size limit) is 400, not 500."""
    status, reply = await _send(broker, "POST", path, data=b"[" * 30000 + b"]" * 30000)
    assert (status, _code(reply)) == (400, "RequestInvalid")


@pytest.mark.parametrize("encoding", [b"gzip", b"deflate"])
async def test_undecodable_content_encoding_is_400(broker: BrokerHarness, encoding: bytes) -> None:
    """A body that is not what its Content-Encoding says is a 400, not a 500."""
    body = json.dumps(PRESIGN).encode()
    header = b"Content-Encoding: " + encoding
    reply = await _raw(
        broker, _request(b"/v1/presign", _bearer(), header, method=b"POST", body=body)
    )
    assert _status(reply) == 400


async def test_valid_compressed_body_is_accepted(broker: BrokerHarness) -> None:
    """A correctly deflated body is read like a plain one (the positive control of the above)."""
    body = zlib.compress(json.dumps(PRESIGN).encode())
    header = b"Content-Encoding: deflate"
    reply = await _raw(
        broker, _request(b"/v1/presign", _bearer(), header, method=b"POST", body=body)
    )
    assert _status(reply) == 200


WRONG_TYPES = [
    ("expires_seconds", "600"),
    ("expires_seconds", 600.0),
    ("expires_seconds", 1.5),
    ("expires_seconds", True),
    ("expires_seconds", [600]),
    ("expires_seconds", {"seconds": 600}),
    ("policy", 1),
    ("policy", ["avatar-upload"]),
    ("policy", {"name": "avatar-upload"}),
    ("policy", None),
    ("key", 12),
    ("key", ["avatars/alice/me.png"]),
    ("key", False),
    ("content_type", ["image/png"]),
    ("content_type", 1),
    ("metadata", ["a", "b"]),
    ("metadata", {"a": 1}),
    ("metadata", {"a": {"b": "c"}}),
    ("metadata", "a=b"),
    ("headers", {"x-oss-forbid-overwrite": True}),
    ("part_number", "1"),
    ("callback", "https://cb.example/"),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES)
async def test_wrong_types_in_presign_are_400(
    broker: BrokerHarness, field: str, value: Any
) -> None:
    """Strings for ints, floats, booleans, arrays and objects where scalars belong: 400."""
    status, reply = await _post(broker, "/v1/presign", {**PRESIGN, field: value})
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_object_bytes", "1024"),
        ("max_object_bytes", 1024.5),
        ("max_object_bytes", True),
        ("success_action_status", "201"),
        ("success_action_status", 202),
        ("signature_version", "v2"),
        ("key_prefix", ["avatars/alice/"]),
        ("expires_seconds", {"$gt": 0}),
    ],
)
async def test_wrong_types_in_post_policy_are_400(
    broker: BrokerHarness, field: str, value: Any
) -> None:
    """The post-policy body is as strict: wrong types and values outside enums are 400."""
    status, reply = await _post(broker, "/v1/post-policy", {**POST_POLICY, field: value})
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/presign", {**PRESIGN, "acl": "public-read"}),
        ("/v1/presign", {**PRESIGN, "Policy": "avatar-upload"}),
        ("/v1/presign", {**PRESIGN, "callback": {"url": "u", "body": "b", "host": "evil"}}),
        ("/v1/post-policy", {**POST_POLICY, "bucket": "otherbucket"}),
        ("/v1/post-policy", {**POST_POLICY, "conditions": [["starts-with", "$key", ""]]}),
    ],
)
async def test_unknown_fields_are_400(broker: BrokerHarness, path: str, body: Any) -> None:
    """Fields the models do not declare, at any depth, are refused, not ignored."""
    status, reply = await _post(broker, path, body)
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


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
    status, reply = await _send(broker, "POST", "/v1/presign", data=raw)
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "key",
    [
        "\uff41vatars/alice/me.png",  # fullwidth a: NFKC folds it to "a"
        "avatars\u2215alice/me.png",  # division slash
        "avatars/alice\uff0fme.png",  # fullwidth solidus
        "avatars/ali\u0301ce/me.png",  # a combining accent inside the subject
        "avatars/alice\u200d/me.png",  # zero-width joiner after the subject
        "\u202eavatars/alice/me.png",  # right-to-left override before the prefix
        "avatars/Alice/me.png",
    ],
)
async def test_lookalikes_of_the_prefix_are_outside_it(broker: BrokerHarness, key: str) -> None:
    """Keys that only look like, or normalize to, the caller's prefix are 403: no folding."""
    status, reply = await _post(broker, "/v1/presign", {**PRESIGN, "key": key})
    assert (status, _code(reply)) == (403, "AccessDenied")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "name",
    [
        "\u00e9.png",  # NFC
        "e\u0301.png",  # NFD of the same
        "a\u200db.png",  # zero-width joiner
        "\u202egnp.exe",  # right-to-left override
        "\u2028.png",  # line separator
    ],
)
async def test_unicode_under_the_prefix_is_signed_verbatim(
    broker: BrokerHarness, name: str
) -> None:
    """Format characters under the prefix are signed byte for byte as sent, never normalized."""
    status, reply = await _post(broker, "/v1/presign", {**PRESIGN, "key": "avatars/alice/" + name})
    assert status == 200, reply
    assert unquote(urlsplit(reply["url"]).path) == "/avatars/alice/" + name


@pytest.mark.parametrize(
    "metadata",
    [{"note": "\u202eevil"}, {"note": "caf\u00e9"}, {"n\u00f6te": "x"}, {"note": "a\u200db"}],
)
async def test_non_ascii_metadata_is_400(broker: BrokerHarness, metadata: dict[str, str]) -> None:
    """Metadata names and values are ASCII: RTL overrides, accents and joiners are refused."""
    status, reply = await _post(broker, "/v1/presign", {**PRESIGN, "metadata": metadata})
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


# --- template injection through identities ---


_HEX = "0" * 64
_UNSAFE_IDS = ["a/b", "${subject}", "*", "a*", "..", ".a", "a\u2215b", "a\uff0fb", "%2F", "", "a b"]


@pytest.mark.parametrize("caller_id", _UNSAFE_IDS)
def test_unsafe_api_key_ids_are_refused_at_config_load(tmp_path: Path, caller_id: str) -> None:
    """An API key id that could widen a prefix is a ConfigError naming file and key."""
    config = tmp_path / "broker.yaml"
    entry = {"id": caller_id, "key_sha256": _HEX}
    config.write_text(json.dumps({"auth": {"api_keys": [entry]}}))  # JSON is YAML
    with pytest.raises(ConfigError) as caught:
        load_settings(config)
    assert f"{config}:" in str(caught.value)
    assert "auth.api_keys.0.id" in str(caught.value)


def test_api_key_id_with_double_dot_is_refused_at_config_load(tmp_path: Path) -> None:
    """An id such as a..b, which can never render into a prefix, is refused at load."""
    config = tmp_path / "broker.yaml"
    config.write_text(json.dumps({"auth": {"api_keys": [{"id": "a..b", "key_sha256": _HEX}]}}))
    with pytest.raises(ConfigError):
        load_settings(config)


_ISSUER = "https://idp.example.com/"
_AUDIENCE = "upload-web"
_TEAM_POLICY = """\
name: team-uploads
description: Per-team uploads, keyed by a JWT claim.
role_arn: acs:ram::1234567890123456:role/oss-service-uploads
bucket: examplebucket
region: cn-hangzhou
prefix: "teams/${claim:team}/"
actions: [put]
duration_seconds: 900
max_url_expires_seconds: 600
callers: ["group:browser"]
"""


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def jwt_broker(
    make_broker: BrokerFactory, tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> BrokerHarness:
    jwks = write_jwks(tmp_path / "jwks.json", signing_key.public_key())
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, policies, ignore=shutil.ignore_patterns("*.md"))
    (policies / "team-uploads.yaml").write_text(_TEAM_POLICY)
    settings = {
        "issuer": _ISSUER,
        "audience": _AUDIENCE,
        "jwks_file": str(jwks),
        "groups": ["browser"],
        "groups_claim": "groups",
    }
    return await make_broker(policies, auth={"jwt": settings})


def _jwt_headers(broker: BrokerHarness, key: rsa.RSAPrivateKey, **claims: Any) -> dict[str, str]:
    now = broker.clock()
    payload = {"iss": _ISSUER, "aud": _AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    payload.update(claims)
    token = jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})
    return {"Authorization": f"Bearer {token}"}


_INJECTIONS = [
    "${subject}",
    "${claim:team}",
    "a/../b",
    "../admin",
    "*",
    "a?",
    "%2F",
    "a%2fb",
    "a\u2215b",
    "a\uff0fb",
    "a\\b",
    "a\nb",
    "a\u0000b",
    "\u202eadmin",
    "x" * 65,
    "",
    ".hidden",
]


@pytest.mark.parametrize("value", _INJECTIONS)
async def test_jwt_subject_injection_is_refused(
    jwt_broker: BrokerHarness, signing_key: rsa.RSAPrivateKey, value: str
) -> None:
    """A JWT sub that could widen avatars/${subject}/ is 403 TemplateValueRejected, before STS."""
    headers = _jwt_headers(jwt_broker, signing_key, sub=value)
    status, reply = await _send(
        jwt_broker, "GET", "/v1/credentials/avatar-upload", caller=None, headers=headers
    )
    assert (status, _code(reply)) == (403, "TemplateValueRejected")
    # Only the variable's name is ever echoed, never the value.
    assert reply["error"]["message"] == "the caller's ${subject} cannot be used in a policy prefix"
    assert jwt_broker.sts.emulator.calls == []


@pytest.mark.parametrize("value", [*_INJECTIONS, 7, ["blue"], {"a": "b"}, None])
async def test_jwt_claim_injection_is_refused(
    jwt_broker: BrokerHarness, signing_key: rsa.RSAPrivateKey, value: Any
) -> None:
    """An unsafe or non-string ${claim:team} value is 403 TemplateValueRejected, before STS."""
    headers = _jwt_headers(jwt_broker, signing_key, team=value)
    status, reply = await _send(
        jwt_broker, "GET", "/v1/credentials/team-uploads", caller=None, headers=headers
    )
    assert (status, _code(reply)) == (403, "TemplateValueRejected")
    assert jwt_broker.sts.emulator.calls == []


async def test_safe_jwt_claim_renders_its_own_prefix(
    jwt_broker: BrokerHarness, signing_key: rsa.RSAPrivateKey
) -> None:
    """The positive control: a safe team claim gets teams/<team>/."""
    headers = _jwt_headers(jwt_broker, signing_key, team="blue")
    status, reply = await _send(
        jwt_broker, "GET", "/v1/credentials/team-uploads", caller=None, headers=headers
    )
    assert (status, reply["Prefix"]) == (200, "teams/blue/")


async def test_template_syntax_in_access_token_is_just_a_wrong_key(broker: BrokerHarness) -> None:
    """An access_token of ${subject} or a wildcard authenticates nobody: 401."""
    for token in ("${subject}", "*", "%2A"):
        status, reply = await _send(
            broker, "GET", f"/v1/credentials/avatar-upload?access_token={token}", caller=None
        )
        assert (status, _code(reply)) == (401, "AuthenticationFailed")
    assert broker.sts.emulator.calls == []


# --- policy names ---


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
    got, reply = await _send(broker, "GET", path)
    assert (got, _code(reply)) == (status, code)
    assert broker.sts.emulator.calls == []


async def test_dot_segments_in_raw_paths_do_not_escape_the_route(broker: BrokerHarness) -> None:
    """Unencoded ../ sent verbatim is normalized before routing: a JSON 404, never a policy."""
    target = b"/v1/credentials/../credentials/..%2F..%2Fpolicies"
    reply = await _raw(broker, _request(target, _bearer()))
    assert _status(reply) == 404
    assert b'"NotFound"' in reply
    assert broker.sts.emulator.calls == []


async def test_policy_name_with_trailing_newline_is_400(broker: BrokerHarness) -> None:
    """/v1/credentials/avatar-upload%0A is malformed (400), like the same name in a body."""
    status, reply = await _send(broker, "GET", "/v1/credentials/avatar-upload%0A")
    assert (status, _code(reply)) == (400, "RequestInvalid")


async def test_policy_name_with_trailing_newline_in_a_body_is_400(broker: BrokerHarness) -> None:
    """In a body, "avatar-upload\\n" fails the pattern: 400 RequestInvalid."""
    status, reply = await _post(broker, "/v1/presign", {**PRESIGN, "policy": "avatar-upload\n"})
    assert (status, _code(reply)) == (400, "RequestInvalid")


# --- expiries and min_ttl_seconds ---


@pytest.mark.parametrize("value", [0, -1, 604801, 10**100, 1e100, "600", True, False, 600.0, [600]])
@pytest.mark.parametrize(
    ("path", "base"), [("/v1/presign", PRESIGN), ("/v1/post-policy", POST_POLICY)]
)
async def test_out_of_range_expiry_is_400(
    broker: BrokerHarness, path: str, base: dict[str, Any], value: Any
) -> None:
    """expires_seconds outside 1..604800, or not a JSON integer, is 400 before STS."""
    status, reply = await _post(broker, path, {**base, "expires_seconds": value})
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("path", "base"), [("/v1/presign", PRESIGN), ("/v1/post-policy", POST_POLICY)]
)
async def test_null_expiry_means_the_policy_cap(
    broker: BrokerHarness, path: str, base: dict[str, Any]
) -> None:
    """expires_seconds: null is the same as leaving it out: the policy's cap, not clamped."""
    status, reply = await _post(broker, path, {**base, "expires_seconds": None})
    assert status == 200, reply
    assert (reply["expires_in"], reply["clamped"]) == (600, False)


@pytest.mark.parametrize(
    "query",
    ["-1", "1e3", "0x10", "+5", " 5", "5 ", "", "1.0", "true", "99999999999999999999999", "841"],
)
async def test_bad_min_ttl_is_400(broker: BrokerHarness, query: str) -> None:
    """min_ttl_seconds that is not a whole number within duration - margin is 400 before STS."""
    status, reply = await _send(
        broker, "GET", f"/v1/credentials/avatar-upload?min_ttl_seconds={query}"
    )
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert reply["StatusCode"] == 400
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "query", ["%C2%B2", "%D9%A1%D9%A2", "%EF%BC%95"], ids=["sup2", "arabic12", "fullwidth5"]
)
async def test_non_ascii_digits_in_min_ttl_are_400(broker: BrokerHarness, query: str) -> None:
    """Only ASCII digits make a min_ttl_seconds: superscript, Arabic-Indic, fullwidth are 400."""
    status, reply = await _send(
        broker, "GET", f"/v1/credentials/avatar-upload?min_ttl_seconds={query}"
    )
    assert (status, _code(reply)) == (400, "RequestInvalid")


# --- CRLF ---


@pytest.mark.parametrize(
    "changes",
    [
        {"content_type": "image/png\r\nX-Evil: 1"},
        {"content_type": "image/png\nX-Evil: 1"},
        {"metadata": {"note": "a\r\nx-oss-object-acl: public-read"}},
        {"metadata": {"note\r\nx-oss-object-acl": "public-read"}},
        {"headers": {"x-oss-forbid-overwrite": "true\r\nx-oss-object-acl: public-read"}},
        {"headers": {"x-oss-forbid-overwrite\r\nx-oss-object-acl": "true"}},
        {"key": "avatars/alice/a\r\nb.png"},
        {"upload_id": "a\r\nb", "operation": "abort_multipart"},
    ],
)
async def test_crlf_in_values_is_400(broker: BrokerHarness, changes: dict[str, Any]) -> None:
    """CR/LF in anything that would become a signed header or URL is refused, never signed."""
    status, reply = await _post(broker, "/v1/presign", {**PRESIGN, **changes})
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert "url" not in reply
    assert broker.sts.emulator.calls == []


async def test_crlf_in_post_policy_content_type_is_400(broker: BrokerHarness) -> None:
    """The post-policy content_type is held to the same pattern."""
    body = {**POST_POLICY, "content_type": "image/png\r\nX-Evil: 1"}
    status, reply = await _post(broker, "/v1/post-policy", body)
    assert (status, _code(reply)) == (400, "RequestInvalid")


@pytest.mark.parametrize(
    "request_id",
    [b"abcdefgh%0d%0aSet-Cookie:%20a=b", b"abcdefgh\\r\\nSet-Cookie: a=b", b"abcdefgh\tx"],
)
async def test_request_id_with_crlf_is_replaced(broker: BrokerHarness, request_id: bytes) -> None:
    """An X-Request-Id carrying (encoded) CR/LF is not echoed: a fresh id, no injected header."""
    reply = await _raw(broker, _request(b"/healthz", b"X-Request-Id: " + request_id))
    head = reply.split(b"\r\n\r\n", 1)[0].lower()
    assert _status(reply) == 200
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
    reply = await _raw(broker, _request(b"/v1/credentials/avatar-upload", header))
    assert _status(reply) == 400
    assert b"set-cookie" not in reply.split(b"\r\n\r\n", 1)[0].lower()
    assert broker.sts.emulator.calls == []


async def test_crlf_in_access_token_is_a_wrong_key(broker: BrokerHarness) -> None:
    """An access_token with encoded CR/LF is 401 and injects no header."""
    target = (
        b"/v1/credentials/avatar-upload?access_token=" + ALICE_KEY.encode() + b"%0D%0AX-Evil:%201"
    )
    reply = await _raw(broker, _request(target))
    assert _status(reply) == 401
    assert b"x-evil" not in reply.lower()


# --- duplicates ---


@pytest.mark.parametrize(
    "query",
    [
        "min_ttl_seconds=0&min_ttl_seconds=0",
        "min_ttl_seconds=0&min_ttl_seconds=60",
        f"access_token={ALICE_KEY}&access_token={ALICE_KEY}",
    ],
)
async def test_duplicate_query_parameters_are_400(broker: BrokerHarness, query: str) -> None:
    """min_ttl_seconds or access_token given twice is 400 RequestInvalid, before STS."""
    caller = None if query.startswith("access_token") else "alice"
    status, reply = await _send(
        broker, "GET", f"/v1/credentials/avatar-upload?{query}", caller=caller
    )
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


async def test_token_in_header_and_query_is_400(broker: BrokerHarness) -> None:
    """A bearer header and an access_token together are 400, whichever is valid."""
    status, reply = await _send(
        broker, "GET", "/v1/credentials/avatar-upload?access_token=other", caller="alice"
    )
    assert (status, _code(reply)) == (400, "RequestInvalid")


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
    status, reply = await _send(broker, "POST", "/v1/presign", data=raw)
    assert (status, _code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


async def test_two_authorization_headers_are_400(broker: BrokerHarness) -> None:
    """Two Authorization headers are ambiguous and refused, like access_token given twice."""
    reply = await _raw(
        broker, _request(b"/v1/policies", _bearer(), b"Authorization: Bearer someone-else")
    )
    assert _status(reply) == 400


async def test_405_lists_the_allowed_methods(broker: BrokerHarness) -> None:
    """POST /v1/policies is 405 MethodNotAllowed with an Allow header naming GET."""
    async with broker.client.post("/v1/policies", headers=broker.auth("alice")) as resp:
        assert resp.status == 405
        assert "GET" in resp.headers.get("Allow", "")


# --- properties of the pure rules ---

_SAFE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-"
_subjects = st.text(_SAFE_CHARS, min_size=1, max_size=64).filter(
    lambda value: value[0].isalnum() and ".." not in value
)
_prefixes = st.one_of(
    st.builds(lambda subject: f"avatars/{subject}/", _subjects),
    st.sampled_from(["reports/", "services/svc-a/", "a/b/c/"]),
)
_any_text = st.text(st.characters(exclude_categories=()), max_size=80)
_bad_parts = st.sampled_from(["..", ".", "\\", "\x00", "\r", "\n", "\x7f", "\x85", "\x1b"])


def _keys_near(prefix: str) -> st.SearchStrategy[str]:
    return st.one_of(
        _any_text,
        st.builds(lambda rest: prefix + rest, _any_text),
        st.builds(lambda rest: prefix[:-1] + rest, _any_text),
        st.builds(lambda rest: "/" + prefix + rest, _any_text),
        st.builds(lambda rest: prefix + "../" + rest, _any_text),
    )


@_BOUNDED
@given(data=st.data(), prefix=_prefixes)
def test_check_key_never_accepts_a_key_outside_the_prefix(data: st.DataObject, prefix: str) -> None:
    """check_key returns only well-formed keys strictly under the prefix; else 400 or 403."""
    key = data.draw(_keys_near(prefix))
    try:
        accepted = check_key(key, prefix)
    except (RequestInvalid, AccessDenied):
        return
    assert accepted == key
    assert key.startswith(prefix)
    assert key != prefix
    assert not key.startswith("/")
    assert "\\" not in key
    assert not any(segment in (".", "..") for segment in key.split("/"))
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in key)
    assert 1 <= len(key.encode("utf-8")) <= MAX_KEY_BYTES


@_BOUNDED
@given(prefix=_prefixes, before=_any_text, bad=_bad_parts, after=_any_text)
def test_check_key_refuses_traversal_and_controls_even_under_the_prefix(
    prefix: str, before: str, bad: str, after: str
) -> None:
    """A key with a ./.. segment, a backslash or a control character is always refused."""
    key = prefix + before.replace("/", "") + "/" + bad + "/" + after
    with pytest.raises((RequestInvalid, AccessDenied)):
        check_key(key, prefix)
    with pytest.raises((RequestInvalid, AccessDenied)):
        check_key("/" + prefix + "x", prefix)


_sane_segment = st.text(
    st.characters(
        categories=["L", "N", "Pd", "Pc"], include_characters="~!()' ", exclude_characters="/\\"
    ),
    min_size=1,
    max_size=30,
).filter(lambda segment: segment not in (".", ".."))


@_BOUNDED
@given(prefix=_prefixes, segments=st.lists(_sane_segment, min_size=1, max_size=6))
def test_check_key_accepts_every_sane_key_under_the_prefix(
    prefix: str, segments: list[str]
) -> None:
    """Printable, traversal-free keys of at most 1023 bytes under the prefix are accepted as is."""
    key = prefix + "/".join(segments)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return
    assert check_key(key, prefix) == key


@functools.cache
def _avatar_policy() -> Policy:
    policy = load_policies(POLICIES_DIR).get("avatar-upload")
    assert policy is not None
    return policy


def _policy(cap: int) -> Policy:
    return _avatar_policy().model_copy(update={"max_url_expires_seconds": cap})


@_BOUNDED
@given(
    requested=st.none() | st.integers(1, MAX_EXPIRES_SECONDS),
    cap=st.integers(1, MAX_EXPIRES_SECONDS),
    remaining=st.floats(-1e3, 2e6, allow_nan=False),
)
def test_clamp_expiry_never_outlives_request_cap_week_or_token(
    requested: int | None, cap: int, remaining: float
) -> None:
    """The lifetime is min(requested, cap, 7 days, floor(token left)); clamped iff shorter."""
    policy = _policy(cap)
    if math.floor(remaining) < 1:
        with pytest.raises(RequestInvalid):
            clamp_expiry(requested, policy, remaining)
        return
    expiry = clamp_expiry(requested, policy, remaining)
    asked = requested if requested is not None else cap
    assert 1 <= expiry.seconds <= min(cap, MAX_EXPIRES_SECONDS, math.floor(remaining))
    assert expiry.seconds <= asked
    assert expiry.seconds == min(asked, cap, math.floor(remaining))
    assert expiry.requested_seconds == min(asked, MAX_EXPIRES_SECONDS)
    assert expiry.clamped == (expiry.seconds < asked)
