"""POST /v1/presign and /v1/post-policy: rules, clamping and the SDK as oracle (no OSS needed)."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import alibabacloud_oss_v2 as oss
import pytest

from broker.auth import Revocations
from broker.models import Credentials
from broker.policies import load_policies
from broker.revocation import revoke
from broker.signing import OssEndpoint, PresignInput
from tests.conftest import (
    POLICIES_DIR,
    TWO_BUCKETS_POLICY,
    BrokerFactory,
    BrokerHarness,
    write_guarded_policies,
)
from tests.signing.sdk_oracle import sdk_presign, sdk_signer_presign


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
    """The broker's URL equals alibabacloud-oss-v2's signer for the same credentials and time."""
    status, body = await _post(
        broker,
        "/v1/presign",
        {"policy": "avatar-upload", "key": "avatars/alice/me.png", "content_type": "image/png"}
        | {"content_length": 1024},
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
        headers={"Content-Type": "image/png", "Content-Length": "1024"},
        additional_headers=("content-length",),
    )
    signed_at = datetime.fromtimestamp(broker.clock(), UTC)
    # The signed Content-Length is signed as the SDK's own SignerV4 signs an additional header.
    assert body["url"] == sdk_signer_presign(creds, request, signed_at)
    assert query["x-oss-additional-headers"] == ["content-length"]
    assert body["signed_headers"] == {"Content-Type": "image/png", "Content-Length": "1024"}
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
    body: dict[str, Any] = {"policy": "avatar-upload", "key": "avatars/alice/me.png"}
    body |= {"content_type": "image/png", "content_length": 1024}
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
    cases: list[tuple[dict[str, Any], str, dict[str, list[str]]]] = [
        ({"operation": "initiate_multipart"}, "POST", {"uploads": [""]}),
        (
            {"operation": "upload_part", "upload_id": "U1", "part_number": 2, "content_length": 9},
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
    part = {"operation": "upload_part", "upload_id": "U1", "content_length": 9}
    status, body = await _post(broker, "/v1/presign", {**base, **part}, "svc-a")
    assert (status, body["error"]["message"]) == (400, "upload_part needs part_number")


async def test_expiry_clamped_to_policy_cap(broker: BrokerHarness) -> None:
    """Asking beyond max_url_expires_seconds gives the cap and clamped: true."""
    status, body = await _post(
        broker,
        "/v1/presign",
        {
            "policy": "avatar-upload",
            "key": "avatars/alice/me.png",
            "content_type": "image/png",
            "content_length": 1024,
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
    sign: dict[str, Any] = {"policy": "avatar-upload", "key": "avatars/alice/me.png"}
    sign |= {"content_type": "image/png", "content_length": 1024}
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


@pytest.fixture
async def guarded(make_broker: BrokerFactory, tmp_path: Path) -> BrokerHarness:
    """A broker with guarded-uploads (no overwrites, 1000 bytes) and free-uploads (neither)."""
    return await make_broker(write_guarded_policies(tmp_path))


_GUARDED_PUT = {
    "policy": "guarded-uploads",
    "key": "guarded/svc-a/day.csv",
    "content_type": "text/csv",
    "content_length": 1000,
}


async def test_guarded_uploads_sign_forbid_overwrite_and_content_length(
    guarded: BrokerHarness,
) -> None:
    """forbid_overwrite is signed where objects are written, Content-Length where bytes go."""
    base = {"policy": "guarded-uploads", "key": "guarded/svc-a/big.csv"}
    part = {"operation": "upload_part", "upload_id": "U1", "part_number": 1, "content_length": 0}
    forbid = {"x-oss-forbid-overwrite": "true"}
    cases = [
        (_GUARDED_PUT, {"Content-Type": "text/csv", "Content-Length": "1000", **forbid}),
        (
            {**base, "operation": "initiate_multipart", "content_type": "text/csv"},
            {"Content-Type": "text/csv", **forbid},
        ),
        ({**base, "operation": "complete_multipart", "upload_id": "U1"}, forbid),
        ({**base, **part}, {"Content-Length": "0"}),
        ({**base, "operation": "abort_multipart", "upload_id": "U1"}, {}),
        ({**base, "operation": "delete_object"}, {}),
    ]
    for request, expected in cases:
        status, body = await _post(guarded, "/v1/presign", request, caller="svc-a")
        assert status == 200, body
        assert body["signed_headers"] == expected, request
        additional = parse_qs(urlsplit(body["url"]).query).get("x-oss-additional-headers")
        assert additional == (["content-length"] if "Content-Length" in expected else None)


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [
        ({"content_length": None}, 400, "content_length is required"),
        ({"content_length": 1001}, 403, "limit of 1000 bytes"),
        ({"content_length": -1}, 400, "content_length"),
        ({"content_length": "5"}, 400, "content_length"),
        ({"content_length": True}, 400, "content_length"),
        ({"headers": {"x-oss-forbid-overwrite": "false"}}, 403, "forbids overwriting"),
        ({"headers": {"X-OSS-Forbid-Overwrite": "false"}}, 403, "forbids overwriting"),
        ({"operation": "get_object", "content_type": None}, 400, "does not take content_length"),
        (
            {"operation": "complete_multipart", "upload_id": "U1", "content_type": None},
            400,
            "does not take content_length",
        ),
    ],
)
async def test_guard_refusals(
    guarded: BrokerHarness, changes: dict[str, Any], status: int, message: str
) -> None:
    """A guarded upload without its size, over it, or asking to overwrite is refused."""
    body = {key: value for key, value in {**_GUARDED_PUT, **changes}.items() if value is not None}
    got, reply = await _post(guarded, "/v1/presign", body, caller="svc-a")
    assert got == status, reply
    assert message in reply["error"]["message"]


async def test_content_length_is_optional_without_a_size_limit(guarded: BrokerHarness) -> None:
    """Without max_object_bytes a PUT may bind its size, or not; nothing else is signed then."""
    put = {"policy": "free-uploads", "key": "free/svc-a/a.csv", "content_type": "text/csv"}
    status, reply = await _post(guarded, "/v1/presign", put, caller="svc-a")
    assert (status, reply["signed_headers"]) == (200, {"Content-Type": "text/csv"}), reply
    status, reply = await _post(guarded, "/v1/presign", {**put, "content_length": 7}, "svc-a")
    assert (status, reply["signed_headers"]["Content-Length"]) == (200, "7"), reply


_OVERRIDES = {
    "response_content_disposition": 'attachment; filename="report 2026.csv"',
    "response_content_type": "text/csv; charset=utf-8",
    "response_cache_control": "private, max-age=600",
}


async def test_presigned_get_with_response_overrides_is_the_sdks(broker: BrokerHarness) -> None:
    """A GET's response-* overrides are signed query parameters, as alibabacloud-oss-v2 signs."""
    key = "services/svc-a/report.csv"
    body = {"policy": "service-uploads", "key": key, "method": "GET", **_OVERRIDES}
    status, reply = await _post(broker, "/v1/presign", body, caller="svc-a")
    assert status == 200, reply
    query = parse_qs(urlsplit(reply["url"]).query)
    assert query["response-content-disposition"] == [_OVERRIDES["response_content_disposition"]]
    creds = _creds(broker, query["x-oss-credential"][0].split("/")[0])
    request = PresignInput(
        method="GET",
        bucket="examplebucket",
        key=key,
        region="cn-hangzhou",
        endpoint=OssEndpoint("oss-cn-hangzhou.aliyuncs.com"),
        expires_seconds=3600,
        query={name.replace("_", "-"): value for name, value in _OVERRIDES.items()},
    )
    model = oss.GetObjectRequest(bucket="examplebucket", key=key, **_OVERRIDES)
    sdk = sdk_presign(creds, request, datetime.fromtimestamp(broker.clock(), UTC), model)
    assert reply["url"] == sdk.url
    assert (reply["method"], reply["signed_headers"]) == ("GET", {})


@pytest.mark.parametrize(("method", "operation"), [("HEAD", "head_object"), ("GET", "get_object")])
async def test_presigned_head_and_get_are_the_sdks(
    broker: BrokerHarness, method: str, operation: str
) -> None:
    """HEAD (by method alone, or head_object) signs as alibabacloud-oss-v2's HeadObject."""
    key = "services/svc-a/report.csv"
    for body in ({"method": method}, {"operation": operation}):
        request_body = {"policy": "service-uploads", "key": key, **body}
        status, reply = await _post(broker, "/v1/presign", request_body, caller="svc-a")
        assert (status, reply["method"]) == (200, method), reply
        query = parse_qs(urlsplit(reply["url"]).query)
        creds = _creds(broker, query["x-oss-credential"][0].split("/")[0])
        request = PresignInput(
            method=method,
            bucket="examplebucket",
            key=key,
            region="cn-hangzhou",
            endpoint=OssEndpoint("oss-cn-hangzhou.aliyuncs.com"),
            expires_seconds=3600,
        )
        sdk = sdk_presign(creds, request, datetime.fromtimestamp(broker.clock(), UTC))
        assert reply["url"] == sdk.url


@pytest.mark.parametrize(
    ("changes", "status", "message"),
    [
        ({"response_content_disposition": "attachment; filename=a.csv"}, 400, "disposition"),
        ({"response_content_disposition": 'inline; filename="a\\\\b"'}, 400, "disposition"),
        ({"response_content_disposition": 'attachment; filename="a\r\nX: y"'}, 400, "dispos"),
        ({"response_content_disposition": "attachment; filename*=UTF-8''%E2%82%AC.csv"}, 200, ""),
        ({"response_content_type": "text/html"}, 403, "page or script"),
        ({"response_content_type": "image/svg+xml"}, 403, "page or script"),
        ({"response_content_type": "text/csv; boundary=x"}, 400, "response_content_type"),
        ({"response_content_type": "text/*"}, 400, "response_content_type"),
        ({"response_cache_control": "max-age=60, no-transform"}, 200, ""),
        ({"response_cache_control": "max-age=-1"}, 400, "response_cache_control"),
        ({"response_cache_control": "public\r\nSet-Cookie: a=b"}, 400, "response_cache_control"),
        ({"response_content_disposition": "x" * 1101}, 400, "response_content_disposition"),
        ({"operation": "head_object", "response_cache_control": "private"}, 400, "does not take"),
        ({"operation": "put_object", "response_cache_control": "private"}, 400, "does not take"),
        ({"method": "DELETE"}, 403, "does not allow delete_object"),
        ({"operation": "delete_object"}, 403, "does not allow delete_object"),
        ({"method": "HEAD", "operation": "get_object"}, 400, "sent with GET, not HEAD"),
    ],
)
async def test_download_requests(
    broker: BrokerHarness, changes: dict[str, Any], status: int, message: str
) -> None:
    """response-* values follow a strict grammar; HEAD and DELETE need their policy action."""
    body = {"policy": "service-uploads", "key": "services/svc-a/a.csv", **changes}
    if "method" not in body and "operation" not in body:
        body["method"] = "GET"
    got, reply = await _post(broker, "/v1/presign", body, caller="svc-a")
    assert got == status, reply
    assert message in (reply.get("error") or {}).get("message", "")


async def test_response_content_type_follows_the_policys_content_types(
    guarded: BrokerHarness,
) -> None:
    """A policy listing content_types allows only those as a download's Content-Type."""
    body = {"policy": "guarded-uploads", "key": "guarded/svc-a/a.csv", "method": "GET"}
    ok = {**body, "response_content_type": "text/csv"}
    status, _ = await _post(guarded, "/v1/presign", ok, caller="svc-a")
    assert status == 200
    status, reply = await _post(
        guarded, "/v1/presign", {**body, "response_content_type": "text/plain"}, caller="svc-a"
    )
    assert (status, reply["error"]["code"]) == (403, "AccessDenied")


@pytest.mark.parametrize("operation", ["get_object", "head_object", "delete_object"])
async def test_downloads_and_deletes_are_clamped_like_uploads(
    guarded: BrokerHarness, operation: str
) -> None:
    """GET, HEAD and DELETE URLs get the policy cap and clamped: true, as PUT does."""
    body = {"policy": "guarded-uploads", "key": "guarded/svc-a/a.csv", "operation": operation}
    status, reply = await _post(guarded, "/v1/presign", {**body, "expires_seconds": 3600}, "svc-a")
    assert status == 200, reply
    assert (reply["expires_in"], reply["clamped"], reply["requested_expires_seconds"]) == (
        600,
        True,
        3600,
    )


@pytest.mark.parametrize(
    ("policy", "asked", "pinned"),
    [
        ("guarded-uploads", None, "true"),
        ("guarded-uploads", True, "true"),
        ("free-uploads", None, "false"),
        ("free-uploads", False, "false"),
        ("free-uploads", True, "true"),
    ],
)
async def test_post_policy_pins_forbid_overwrite_as_the_policy_says(
    guarded: BrokerHarness, policy: str, asked: bool | None, pinned: str
) -> None:
    """A forbid_overwrite policy pins x-oss-forbid-overwrite to true; others pin what is asked."""
    body: dict[str, Any] = {"policy": policy, "content_type": "text/csv"}
    if asked is not None:
        body["forbid_overwrite"] = asked
    status, reply = await _post(guarded, "/v1/post-policy", body, caller="svc-a")
    assert status == 200, reply
    conditions = json.loads(base64.b64decode(reply["fields"]["policy"]))["conditions"]
    assert ["eq", "$x-oss-forbid-overwrite", pinned] in conditions
    assert reply["fields"]["x-oss-forbid-overwrite"] == pinned


async def test_post_policy_may_not_ask_to_overwrite_under_forbid_overwrite(
    guarded: BrokerHarness,
) -> None:
    """forbid_overwrite: false in a post-policy body is 403 under a forbid_overwrite policy."""
    body = {"policy": "guarded-uploads", "content_type": "text/csv", "forbid_overwrite": False}
    status, reply = await _post(guarded, "/v1/post-policy", body, caller="svc-a")
    assert (status, reply["error"]["code"]) == (403, "AccessDenied")
    assert "forbids overwriting" in reply["error"]["message"]


# --- multi-grant policies: the grant holding the key signs ---


@pytest.fixture
async def two_buckets(make_broker: BrokerFactory, tmp_path: Path) -> BrokerHarness:
    """A broker with two-buckets: read examplebucket/reports/, write otherbucket/drop/<caller>/."""
    (tmp_path / "two-buckets.yaml").write_text(TWO_BUCKETS_POLICY)
    return await make_broker(tmp_path)


async def test_several_buckets_need_a_bucket_which_picks_the_grant(
    two_buckets: BrokerHarness,
) -> None:
    """Without bucket: 400 BucketAmbiguous naming both; with it, the URL is for that bucket."""
    body = {"policy": "two-buckets", "key": "drop/svc-a/x.csv", "content_length": 1}
    status, reply = await _post(two_buckets, "/v1/presign", body, caller="svc-a")
    assert (status, reply["error"]["code"]) == (400, "BucketAmbiguous"), reply
    assert reply["error"]["message"].endswith("give bucket: examplebucket, otherbucket")
    status, reply = await _post(
        two_buckets, "/v1/presign", {**body, "bucket": "otherbucket"}, caller="svc-a"
    )
    assert status == 200, reply
    assert urlsplit(reply["url"]).netloc == "otherbucket.oss-cn-hangzhou.aliyuncs.com"
    wrong = {**body, "bucket": "examplebucket"}
    status, reply = await _post(two_buckets, "/v1/presign", wrong, caller="svc-a")
    assert (status, reply["error"]["code"]) == (403, "AccessDenied"), reply
    assert _assume_role_calls(two_buckets) == 1  # refusals never reach STS


async def test_a_post_policy_is_for_its_grants_bucket(two_buckets: BrokerHarness) -> None:
    """A form for otherbucket's grant posts to that bucket and names it in V1's policy."""
    body = {"policy": "two-buckets", "bucket": "otherbucket", "signature_version": "v1"}
    status, reply = await _post(two_buckets, "/v1/post-policy", body, caller="svc-a")
    assert status == 200, reply
    assert reply["host"] == "https://otherbucket.oss-cn-hangzhou.aliyuncs.com"
    conditions = json.loads(base64.b64decode(reply["fields"]["policy"]))["conditions"]
    assert {"bucket": "otherbucket"} in conditions
    assert ["starts-with", "$key", "drop/svc-a/"] in conditions
    reads = {**body, "bucket": "examplebucket"}
    status, reply = await _post(two_buckets, "/v1/post-policy", reads, caller="svc-a")
    assert (status, reply["error"]["code"]) == (403, "AccessDenied"), reply
    assert "does not allow uploads under examplebucket/reports/" in reply["error"]["message"]


def _assume_role_calls(broker: BrokerHarness) -> int:
    return broker.sts.emulator.assume_role_calls()


_PRESIGN: dict[str, Any] = {
    "policy": "avatar-upload",
    "key": "avatars/alice/me.png",
    "content_type": "image/png",
    "content_length": 1024,
}
_POST_POLICY = {"policy": "avatar-upload", "content_type": "image/png"}


async def test_a_revocation_refuses_the_next_presign_and_post_policy(
    broker: BrokerHarness,
) -> None:
    """Signing memos kept or not, a revoked caller's very next presign and form are 401."""
    for _ in range(2):
        assert (await _post(broker, "/v1/presign", _PRESIGN))[0] == 200
        assert (await _post(broker, "/v1/post-policy", _POST_POLICY))[0] == 200
    await revoke(broker.services, Revocations(callers=frozenset({"alice"})))
    for path, body in (("/v1/presign", _PRESIGN), ("/v1/post-policy", _POST_POLICY)):
        status, reply = await _post(broker, path, body)
        assert (status, reply["error"]["code"]) == (401, "AuthenticationFailed")


async def test_a_policy_reload_takes_effect_on_the_next_presign(
    broker: BrokerHarness, tmp_path: Path
) -> None:
    """A reload that removes the policy: the next presign and form are 403, not a kept scope."""
    for _ in range(2):
        assert (await _post(broker, "/v1/presign", _PRESIGN))[0] == 200
        assert (await _post(broker, "/v1/post-policy", _POST_POLICY))[0] == 200
    shutil.copy(POLICIES_DIR / "reports-read.yaml", tmp_path)
    broker.services.policies = load_policies(tmp_path)  # what a reload swaps in
    for path, body in (("/v1/presign", _PRESIGN), ("/v1/post-policy", _POST_POLICY)):
        status, reply = await _post(broker, path, body)
        assert (status, reply["error"]["code"]) == (403, "AccessDenied")
