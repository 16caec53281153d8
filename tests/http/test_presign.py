"""POST /v1/presign and /v1/post-policy: rules, clamping and the SDK as oracle (no OSS needed)."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from broker.models import Credentials
from broker.signing import OssEndpoint, PresignInput
from tests.conftest import BrokerFactory, BrokerHarness
from tests.signing.sdk_oracle import sdk_presign


async def _post(
    broker: BrokerHarness, path: str, body: Any, caller: str = "alice", **kwargs: Any
) -> tuple[int, Any]:
    async with broker.client.post(path, json=body, headers=broker.auth(caller), **kwargs) as resp:
        return resp.status, await resp.json()


def _creds(broker: BrokerHarness, access_key_id: str) -> Credentials:
    issued = broker.sts.emulator.issued[access_key_id]
    return Credentials(
        access_key_id=issued.access_key_id,
        access_key_secret=issued.access_key_secret,
        security_token=issued.security_token,
        expiration=datetime.fromtimestamp(issued.expires_at, UTC),
    )


async def test_presigned_put_is_byte_identical_to_the_sdk(broker: BrokerHarness) -> None:
    """The broker's URL equals alibabacloud-oss-v2's presign() for the same credentials and time."""
    status, body = await _post(
        broker,
        "/v1/presign",
        {"policy": "avatar-upload", "key": "avatars/alice/me.png", "content_type": "image/png"},
    )
    assert status == 200, body
    query = parse_qs(urlsplit(body["url"]).query)
    creds = _creds(broker, query["x-oss-credential"][0].split("/")[0])
    request = PresignInput(
        method="PUT",
        bucket="examplebucket",
        key="avatars/alice/me.png",
        region="cn-hangzhou",
        endpoint=OssEndpoint("oss-cn-hangzhou.aliyuncs.com"),
        expires_seconds=600,
        headers={"Content-Type": "image/png"},
    )
    sdk = sdk_presign(creds, request, datetime.fromtimestamp(broker.clock(), UTC))
    assert body["url"] == sdk.url
    assert body["signed_headers"] == {"Content-Type": "image/png"}
    assert body["method"] == "PUT"
    assert body["expires_in"] == 600
    assert body["clamped"] is False
    assert body["requested_expires_seconds"] == 600


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"key": "avatars/bob/me.png"}, 403, "AccessDenied"),
        ({"key": "avatars/alice/"}, 403, "AccessDenied"),
        ({"key": "avatars/alicex/me.png"}, 403, "AccessDenied"),
        ({"key": "avatars/alice/../bob/me.png"}, 400, "RequestInvalid"),
        ({"key": "/avatars/alice/me.png"}, 400, "RequestInvalid"),
        ({"key": "avatars/alice/a\\b.png"}, 400, "RequestInvalid"),
        ({"key": "avatars/alice/a\r\nb.png"}, 400, "RequestInvalid"),
        ({"key": "avatars/alice/" + "é" * 600}, 400, "RequestInvalid"),
        ({"key": ""}, 400, "RequestInvalid"),
        ({"content_type": "text/html"}, 403, "AccessDenied"),
        ({"content_type": None}, 400, "RequestInvalid"),
        ({"content_type": "image/png\r\nX-Evil: 1"}, 400, "RequestInvalid"),
        ({"operation": "get_object"}, 403, "AccessDenied"),
        ({"method": "GET"}, 403, "AccessDenied"),
        ({"method": "GET", "operation": "put_object"}, 400, "RequestInvalid"),
        ({"method": "POST"}, 400, "RequestInvalid"),
        ({"expires_seconds": 0}, 400, "RequestInvalid"),
        ({"expires_seconds": 604801}, 400, "RequestInvalid"),
        ({"expires_seconds": "60"}, 400, "RequestInvalid"),
        ({"unknown": 1}, 400, "RequestInvalid"),
        ({"headers": {"x-oss-object-acl": "public-read"}}, 400, "RequestInvalid"),
        ({"headers": {"x-oss-forbid-overwrite": "maybe"}}, 400, "RequestInvalid"),
        ({"metadata": {"Bad Name": "x"}}, 400, "RequestInvalid"),
        ({"metadata": {"ok": "line\nbreak"}}, 400, "RequestInvalid"),
        ({"callback": {"url": "https://evil.example/cb", "body": "x"}}, 403, "AccessDenied"),
        ({"upload_id": "abc"}, 400, "RequestInvalid"),
        ({"policy": "../avatar-upload"}, 400, "RequestInvalid"),
        ({"policy": "no-such-policy"}, 403, "AccessDenied"),
    ],
)
async def test_presign_refusals(
    broker: BrokerHarness, changes: dict[str, Any], status: int, code: str
) -> None:
    """Each bad presign request gets its 4xx and stable code, and nothing is signed."""
    body = {"policy": "avatar-upload", "key": "avatars/alice/me.png", "content_type": "image/png"}
    body.update(changes)
    body = {key: value for key, value in body.items() if value is not None}
    got_status, reply = await _post(broker, "/v1/presign", body)
    assert (got_status, reply["error"]["code"]) == (status, code), reply
    assert "url" not in reply


@pytest.mark.parametrize(
    "raw",
    [b"", b"not json", b"[1, 2]", b'{"policy": "a", "policy": "b"}', b"\xff\xfe", b"null"],
)
async def test_malformed_bodies(broker: BrokerHarness, raw: bytes) -> None:
    """Bodies that are not one JSON object with unique fields get 400 RequestInvalid."""
    async with broker.client.post(
        "/v1/presign",
        data=raw,
        headers={**broker.auth("alice"), "Content-Type": "application/json"},
    ) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"]["code"] == "RequestInvalid"


async def test_oversized_body_is_413(make_broker: BrokerFactory) -> None:
    """A body over listen.max_body_bytes gets 413 RequestTooLarge in the JSON shape."""
    broker = await make_broker(listen={"max_body_bytes": 1024})
    body = {"policy": "avatar-upload", "key": "avatars/alice/" + "a" * 2000}
    status, reply = await _post(broker, "/v1/presign", body)
    assert status == 413
    assert reply["error"]["code"] == "RequestTooLarge"


async def test_multipart_operations_sign_their_sub_resources(broker: BrokerHarness) -> None:
    """initiate, upload_part, complete and abort carry uploads / partNumber / uploadId."""
    base = {"policy": "service-uploads", "key": "services/svc-a/big.bin"}
    cases = [
        ({"operation": "initiate_multipart"}, "POST", {"uploads": [""]}),
        (
            {"operation": "upload_part", "upload_id": "U1", "part_number": 2},
            "PUT",
            {"partNumber": ["2"], "uploadId": ["U1"]},
        ),
        ({"operation": "complete_multipart", "upload_id": "U1"}, "POST", {"uploadId": ["U1"]}),
        ({"operation": "abort_multipart", "upload_id": "U1"}, "DELETE", {"uploadId": ["U1"]}),
    ]
    for changes, method, expected in cases:
        status, body = await _post(broker, "/v1/presign", {**base, **changes}, caller="svc-a")
        assert status == 200, body
        assert body["method"] == method
        query = parse_qs(urlsplit(body["url"]).query, keep_blank_values=True)
        assert {key: query[key] for key in expected} == expected
    status, body = await _post(
        broker, "/v1/presign", {**base, "operation": "upload_part", "upload_id": "U1"}, "svc-a"
    )
    assert status == 400


async def test_expiry_clamped_to_policy_cap(broker: BrokerHarness) -> None:
    """Asking beyond max_url_expires_seconds gives the cap and clamped: true."""
    status, body = await _post(
        broker,
        "/v1/presign",
        {
            "policy": "avatar-upload",
            "key": "avatars/alice/me.png",
            "content_type": "image/png",
            "expires_seconds": 3600,
        },
    )
    assert status == 200
    assert (body["expires_in"], body["clamped"], body["requested_expires_seconds"]) == (
        600,
        True,
        3600,
    )


async def test_expiry_clamped_to_token_and_fresh_token_fetched_when_it_helps(
    broker: BrokerHarness,
) -> None:
    """A URL never outlives its token; a fresh token is fetched when it would allow more.

    When STS cannot give one, the still-valid cached token signs a clamped URL.
    """
    sign = {"policy": "avatar-upload", "key": "avatars/alice/me.png", "content_type": "image/png"}
    await _post(broker, "/v1/presign", sign)
    broker.clock.advance(400)  # the 900 s token has 500 s left, the policy allows 600 s
    status, body = await _post(broker, "/v1/presign", sign)
    assert status == 200
    assert body["expires_in"] == 600  # a fresh token was fetched rather than clamping to 500
    assert broker.sts.emulator.assume_role_calls() == 2
    broker.sts.emulator.faults.update({"error_status": 500})  # now no fresh token can be had
    broker.clock.advance(400)  # 500 s left on the second token
    await broker.services.cache.join()
    status, body = await _post(broker, "/v1/presign", {**sign, "expires_seconds": 550})
    assert status == 200
    assert (body["expires_in"], body["clamped"], body["requested_expires_seconds"]) == (
        500,
        True,
        550,
    )
    assert broker.sts.emulator.calls[-1].outcome != "issued"


async def test_post_policy_v4_fields_and_conditions(broker: BrokerHarness) -> None:
    """The V4 form carries the signature fields and a policy with the expected conditions.

    ACL, overwrite, redirect and callback are pinned with ``eq`` (broker.uploads).
    """
    status, body = await _post(
        broker,
        "/v1/post-policy",
        {"policy": "avatar-upload", "content_type": "image/png", "success_action_status": 201},
    )
    assert status == 200, body
    fields = body["fields"]
    assert body["host"] == "https://examplebucket.oss-cn-hangzhou.aliyuncs.com"
    assert fields["key"] == "avatars/alice/${filename}"
    assert fields["x-oss-signature-version"] == "OSS4-HMAC-SHA256"
    assert fields["Content-Type"] == "image/png"
    document = json.loads(base64.b64decode(fields["policy"]))
    conditions = document["conditions"]
    assert {"bucket": "examplebucket"} in conditions
    assert ["starts-with", "$key", "avatars/alice/"] in conditions
    assert ["content-length-range", 0, 5242880] in conditions
    assert ["eq", "$Content-Type", "image/png"] in conditions
    assert {"x-oss-security-token": fields["x-oss-security-token"]} in conditions
    assert {"success_action_status": "201"} in conditions
    for name, pinned in [
        ("x-oss-object-acl", "default"),
        ("x-oss-forbid-overwrite", "false"),
        ("success_action_redirect", ""),
        ("callback", ""),
    ]:
        assert ["eq", f"${name}", pinned] in conditions
        assert fields[name] == pinned
    assert body["expires_in"] == 600
    expected = datetime.fromtimestamp(broker.clock() + 600, UTC)
    assert document["expiration"] == expected.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert body["expiration"] == expected.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(
    ("changes", "status", "code"),
    [
        ({"key_prefix": "avatars/"}, 403, "AccessDenied"),
        ({"key_prefix": "avatars/alice/../"}, 400, "RequestInvalid"),
        ({"key": "avatars/bob/x.png"}, 403, "AccessDenied"),
        ({"key": "avatars/alice/x.png", "key_prefix": "avatars/alice/"}, 400, "RequestInvalid"),
        ({"max_object_bytes": 5242881}, 400, "RequestInvalid"),
        ({"content_type": "text/html"}, 403, "AccessDenied"),
        ({"content_type": None}, 400, "RequestInvalid"),
        ({"signature_version": "v2"}, 400, "RequestInvalid"),
    ],
)
async def test_post_policy_refusals(
    broker: BrokerHarness, changes: dict[str, Any], status: int, code: str
) -> None:
    """key_prefix may only narrow, sizes only shrink, content types come from the policy."""
    body = {"policy": "avatar-upload", "content_type": "image/png", **changes}
    body = {key: value for key, value in body.items() if value is not None}
    got_status, reply = await _post(broker, "/v1/post-policy", body)
    assert (got_status, reply["error"]["code"]) == (status, code), reply


async def test_post_policy_narrowing_and_v1(broker: BrokerHarness) -> None:
    """A narrower key_prefix and a lower size are honoured; V1 gives OSSAccessKeyId fields."""
    status, body = await _post(
        broker,
        "/v1/post-policy",
        {
            "policy": "avatar-upload",
            "content_type": "image/png",
            "key_prefix": "avatars/alice/2026/",
            "max_object_bytes": 1024,
            "signature_version": "v1",
        },
    )
    assert status == 200, body
    fields = body["fields"]
    assert set(fields) >= {"OSSAccessKeyId", "Signature", "policy", "x-oss-security-token"}
    conditions = json.loads(base64.b64decode(fields["policy"]))["conditions"]
    assert ["starts-with", "$key", "avatars/alice/2026/"] in conditions
    assert ["content-length-range", 0, 1024] in conditions
