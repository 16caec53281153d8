"""Uploads end to end: broker-signed URLs and forms and vended credentials, at the OSS emulator."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import alibabacloud_oss_v2 as oss
import pytest
from aiohttp.test_utils import TestClient
from alibabacloud_oss_v2.aio import AsyncClient

from broker.auth import hash_api_key
from broker.dev.stack import DevStack, dev_stack
from broker.policies import load_policies
from tests.conftest import POLICIES_DIR, FakeClock, start_test_server, write_guarded_policies

CALLER_KEYS = {"svc-a": "canary-e2e-svc-a", "alice": "canary-e2e-alice"}


@dataclass
class Stack:
    dev: DevStack
    client: TestClient[Any, Any]
    clock: FakeClock

    def auth(self, caller: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {CALLER_KEYS[caller]}"}

    async def post(self, path: str, body: dict[str, Any], caller: str = "svc-a") -> Any:
        async with self.client.post(path, json=body, headers=self.auth(caller)) as resp:
            assert resp.status == 200, await resp.text()
            return await resp.json()


@pytest.fixture
async def stack(tmp_path: Path, clock: FakeClock, aiohttp_client: Any) -> AsyncIterator[Stack]:
    policies = load_policies(POLICIES_DIR)
    api_keys = [
        {"id": "svc-a", "key_sha256": hash_api_key(CALLER_KEYS["svc-a"]), "groups": ["internal"]},
        {"id": "alice", "key_sha256": hash_api_key(CALLER_KEYS["alice"]), "groups": ["browser"]},
    ]
    async with dev_stack(
        policies, POLICIES_DIR, tmp_path / "oss", port=0, clock=clock, extra_api_keys=api_keys
    ) as dev:
        client = await aiohttp_client(await start_test_server(dev.services))
        yield Stack(dev, client, clock)


async def _send(
    method: str, url: str, headers: dict[str, str], data: bytes = b""
) -> tuple[int, str, dict[str, str]]:
    """Send exactly the signed headers (aiohttp would otherwise add a Content-Type)."""
    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as session,
        session.request(method, url, headers=headers, data=data) as resp,
    ):
        return resp.status, await resp.text(), {k.lower(): v for k, v in resp.headers.items()}


async def _complete(
    stack: Stack, base: dict[str, Any], upload_id: str, etags: list[str]
) -> None:
    """Complete a multipart upload through a presigned POST listing ``etags`` in order."""
    listing = "".join(
        f"<Part><PartNumber>{n}</PartNumber><ETag>{etag}</ETag></Part>"
        for n, etag in enumerate(etags, start=1)
    )
    xml = f"<CompleteMultipartUpload>{listing}</CompleteMultipartUpload>".encode()
    done = await stack.post(
        "/v1/presign", {**base, "operation": "complete_multipart", "upload_id": upload_id}
    )
    status, text, _ = await _send("POST", done["url"], done["signed_headers"], xml)
    assert status == 200, text


def _sdk(stack: Stack, creds: dict[str, Any], secret: str | None = None) -> AsyncClient:
    provider = oss.credentials.StaticCredentialsProvider(
        creds["AccessKeyId"], secret or creds["AccessKeySecret"], creds["SecurityToken"]
    )
    location = creds["Oss"]  # used as given: the endpoint carries its http:// scheme
    config = oss.config.Config(
        region=location["Region"],
        endpoint=location["Endpoint"],
        credentials_provider=provider,
        use_path_style=location["AddressStyle"] == "path",
    )
    return AsyncClient(config)


async def test_official_sdk_with_vended_credentials_puts_and_gets(stack: Stack) -> None:
    """alibabacloud-oss-v2 with broker-vended credentials puts and gets under the prefix."""
    async with stack.client.get(
        "/v1/credentials/service-uploads", headers=stack.auth("svc-a")
    ) as resp:
        creds = await resp.json()
    client = _sdk(stack, creds)
    try:
        key = creds["Oss"]["Prefix"] + "report.csv"
        await client.put_object(
            oss.PutObjectRequest(bucket=creds["Oss"]["Bucket"], key=key, body=b"a,b\n1,2\n")
        )
        result = await client.get_object(
            oss.GetObjectRequest(bucket=creds["Oss"]["Bucket"], key=key)
        )
        assert await result.body.read() == b"a,b\n1,2\n"
        with pytest.raises(oss.exceptions.OperationError) as outside:
            await client.put_object(
                oss.PutObjectRequest(
                    bucket=creds["Oss"]["Bucket"], key="services/svc-b/x", body=b"x"
                )
            )
        assert "AccessDenied" in str(outside.value)
    finally:
        await client.close()


async def test_tampered_secret_gets_signature_does_not_match(stack: Stack) -> None:
    """The same SDK client with a tampered secret is refused with SignatureDoesNotMatch."""
    async with stack.client.get(
        "/v1/credentials/service-uploads", headers=stack.auth("svc-a")
    ) as resp:
        creds = await resp.json()
    secret = creds["AccessKeySecret"]
    # Change the last character to one it is not (a fixed "x" left 1 secret in 64 intact).
    tampered = secret[:-1] + ("y" if secret.endswith("x") else "x")
    client = _sdk(stack, creds, secret=tampered)
    try:
        with pytest.raises(oss.exceptions.OperationError) as err:
            await client.put_object(
                oss.PutObjectRequest(
                    bucket=creds["Oss"]["Bucket"], key=creds["Oss"]["Prefix"] + "x", body=b"x"
                )
            )
        assert "SignatureDoesNotMatch" in str(err.value)
    finally:
        await client.close()


async def test_presigned_put_lands_and_is_bound_to_key_and_content_type(stack: Stack) -> None:
    """A presigned PUT stores the bytes; reused for another key or Content-Type it is refused."""
    signed = await stack.post(
        "/v1/presign",
        {"policy": "avatar-upload", "key": "avatars/alice/me.png", "content_type": "image/png"}
        | {"content_length": 6},
        caller="alice",
    )
    status, _, _ = await _send("PUT", signed["url"], signed["signed_headers"], b"\x89PNG-1")
    assert status == 200
    assert stack.dev.oss.read_object("examplebucket", "avatars/alice/me.png") == b"\x89PNG-1"
    other_key = signed["url"].replace("avatars/alice/me.png", "avatars/alice/other.png")
    status, text, _ = await _send("PUT", other_key, signed["signed_headers"], b"xxxxxx")
    assert status == 403
    assert "SignatureDoesNotMatch" in text
    html = {"Content-Type": "text/html", "Content-Length": "6"}
    status, text, _ = await _send("PUT", signed["url"], html, b"<p>hi!")
    assert status == 403
    assert "SignatureDoesNotMatch" in text
    assert stack.dev.oss.read_object("examplebucket", "avatars/alice/me.png") == b"\x89PNG-1"


async def test_clamped_url_dies_with_its_short_lived_token(
    tmp_path: Path, clock: FakeClock, aiohttp_client: Any, stack: Stack
) -> None:
    """Asking 3,600 s of a 300 s token gives ≤ 300 s, clamped; it fails once the token expires."""
    stack.dev.sts._lifetime_seconds = 300  # this account's tokens live 5 minutes
    policy_file = tmp_path / "long-urls.yaml"
    policy_file.write_text(
        (POLICIES_DIR / "service-uploads.yaml")
        .read_text()
        .replace("name: service-uploads", "name: long-urls")
    )
    stack.dev.services.policies = load_policies(tmp_path)
    signed = await stack.post(
        "/v1/presign",
        {"policy": "long-urls", "key": "services/svc-a/big.bin", "expires_seconds": 3600}
        | {"content_length": 5},
    )
    assert signed["clamped"] is True
    assert signed["requested_expires_seconds"] == 3600
    assert signed["expires_in"] <= 300
    stack.clock.advance(200)
    status, _, _ = await _send("PUT", signed["url"], signed["signed_headers"], b"early")
    assert status == 200
    stack.clock.advance(101)
    status, text, _ = await _send("PUT", signed["url"], signed["signed_headers"], b"late!")
    assert status == 403
    assert "expired" in text.lower()


async def test_three_part_multipart_upload_with_presigned_urls_only(stack: Stack) -> None:
    """Initiate, three parts and complete, all by presigned URL, assemble byte-exactly."""
    key = "services/svc-a/video.bin"
    parts = [bytes([index]) * (102_400 + index) for index in range(1, 4)]  # OSS: parts ≥ 100 KiB
    base = {"policy": "service-uploads", "key": key}
    init = await stack.post("/v1/presign", {**base, "operation": "initiate_multipart"})
    status, text, _ = await _send("POST", init["url"], init["signed_headers"])
    assert status == 200, text
    upload_id = text.split("<UploadId>")[1].split("</UploadId>")[0]
    etags = []
    for number, data in enumerate(parts, start=1):
        part = await stack.post(
            "/v1/presign",
            {**base, "operation": "upload_part", "upload_id": upload_id, "part_number": number}
            | {"content_length": len(data)},
        )
        status, text, headers = await _send("PUT", part["url"], part["signed_headers"], data)
        assert status == 200, text
        etags.append(headers["etag"])
    await _complete(stack, base, upload_id, etags)
    stored = stack.dev.oss.read_object("examplebucket", key)
    assert stored is not None
    assert hashlib.sha256(stored).digest() == hashlib.sha256(b"".join(parts)).digest()


@pytest.mark.parametrize("version", ["v4", "v1"])
async def test_post_policy_form_uploads(stack: Stack, version: str) -> None:
    """Broker-signed PostObject forms (V4 and V1) upload; a file over the size limit is refused."""
    form = await stack.post(
        "/v1/post-policy",
        {
            "policy": "avatar-upload",
            "content_type": "image/png",
            "max_object_bytes": 1000,
            "success_action_status": 201,
            "signature_version": version,
        },
        caller="alice",
    )

    async def post(content: bytes) -> tuple[int, str]:
        data = aiohttp.FormData()
        for name, value in form["fields"].items():
            data.add_field(name, value)
        data.add_field("file", content, filename="face.png", content_type="image/png")
        async with (
            aiohttp.ClientSession() as session,
            session.post(form["host"], data=data) as resp,
        ):
            return resp.status, await resp.text()

    status, text = await post(b"\x89PNG" + b"." * 100)
    assert status == 201, text
    assert (
        stack.dev.oss.read_object("examplebucket", "avatars/alice/face.png")
        == b"\x89PNG" + b"." * 100
    )
    status, text = await post(b"x" * 1001)
    assert status == 400
    assert "EntityTooLarge" in text


# --- upload guards and downloads: policies/README.md "Upload guards" -------------


@pytest.fixture
async def guarded(stack: Stack, tmp_path: Path) -> Stack:
    """The stack serving guarded-uploads (no overwrites, 1000 bytes) and free-uploads."""
    policies_dir = tmp_path / "policies"
    policies_dir.mkdir()
    stack.dev.services.policies = load_policies(write_guarded_policies(policies_dir))
    return stack


async def _upload(url: str, signed_headers: dict[str, str], data: bytes) -> tuple[int, str]:
    """Send the signed headers as a browser's fetch() does: its own Content-Length, from data."""
    sent = {name: value for name, value in signed_headers.items() if name != "Content-Length"}
    status, text, _ = await _send("PUT", url, sent, data)
    return status, text


async def _presign_csv(stack: Stack, key: str, size: int) -> dict[str, Any]:
    body = {"policy": "guarded-uploads", "key": key, "content_type": "text/csv"}
    result: dict[str, Any] = await stack.post("/v1/presign", {**body, "content_length": size})
    return result


async def test_forbid_overwrite_refuses_a_second_presigned_put(guarded: Stack) -> None:
    """Under forbid_overwrite a second presigned PUT to a key is 409 and the first bytes stay."""
    key = "guarded/svc-a/day.csv"
    first = await _presign_csv(guarded, key, 4)
    assert await _upload(first["url"], first["signed_headers"], b"a,b\n") == (200, "")
    second = await _presign_csv(guarded, key, 4)
    status, text = await _upload(second["url"], second["signed_headers"], b"c,d\n")
    assert (status, "FileAlreadyExists" in text) == (409, True), text
    unforbidden = dict(second["signed_headers"])
    del unforbidden["x-oss-forbid-overwrite"]  # the uploader cannot opt out: it is signed
    status, text = await _upload(second["url"], unforbidden, b"c,d\n")
    assert (status, "SignatureDoesNotMatch" in text) == (403, True), text
    assert guarded.dev.oss.read_object("examplebucket", key) == b"a,b\n"


async def test_forbid_overwrite_refuses_multipart_initiate_and_completion(guarded: Stack) -> None:
    """Initiate onto an existing key is 409; so is Complete when the key appeared meanwhile."""
    key, base = (
        "guarded/svc-a/big.csv",
        {"policy": "guarded-uploads", "key": "guarded/svc-a/big.csv"},
    )
    init = await guarded.post(
        "/v1/presign", {**base, "operation": "initiate_multipart", "content_type": "text/csv"}
    )
    status, text, _ = await _send("POST", init["url"], init["signed_headers"])
    assert status == 200, text
    upload_id = text.split("<UploadId>")[1].split("</UploadId>")[0]
    part_request = {"operation": "upload_part", "upload_id": upload_id, "part_number": 1}
    part = await guarded.post("/v1/presign", {**base, **part_request, "content_length": 7})
    status, text, headers = await _send("PUT", part["url"], part["signed_headers"], b"x,y,z\n.")
    assert status == 200, text
    put = await _presign_csv(guarded, key, 4)
    assert await _upload(put["url"], put["signed_headers"], b"won\n") == (200, "")
    done = await guarded.post(
        "/v1/presign", {**base, "operation": "complete_multipart", "upload_id": upload_id}
    )
    xml = (
        "<CompleteMultipartUpload><Part><PartNumber>1</PartNumber>"
        f"<ETag>{headers['etag']}</ETag></Part></CompleteMultipartUpload>"
    ).encode()
    status, text, _ = await _send("POST", done["url"], done["signed_headers"], xml)
    assert (status, "FileAlreadyExists" in text) == (409, True), text
    status, text, _ = await _send("POST", init["url"], init["signed_headers"])
    assert (status, "FileAlreadyExists" in text) == (409, True), text
    assert guarded.dev.oss.read_object("examplebucket", key) == b"won\n"


async def test_signed_content_length_binds_the_upload_size(guarded: Stack) -> None:
    """A URL signed for 10 bytes takes exactly 10: 11 bytes, or no length, is refused."""
    signed = await _presign_csv(guarded, "guarded/svc-a/ten.csv", 10)
    assert signed["signed_headers"]["Content-Length"] == "10"
    status, text = await _upload(signed["url"], signed["signed_headers"], b"0123456789!")
    assert (status, "SignatureDoesNotMatch" in text) == (403, True), text

    async def stream() -> AsyncIterator[bytes]:
        yield b"0123456789"

    async with (
        aiohttp.ClientSession(skip_auto_headers=["Content-Type"]) as session,
        session.put(signed["url"], headers={"Content-Type": "text/csv"}, data=stream()) as resp,
    ):
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        text = await resp.text()
        assert (resp.status, "SignatureDoesNotMatch" in text) == (403, True), text
    assert guarded.dev.oss.read_object("examplebucket", "guarded/svc-a/ten.csv") is None
    assert await _upload(signed["url"], signed["signed_headers"], b"0123456789") == (200, "")


async def _post_form(host: str, fields: dict[str, str], content: bytes) -> tuple[int, str]:
    data = aiohttp.FormData()
    for name, value in fields.items():
        data.add_field(name, value)
    data.add_field("file", content, filename="day.csv", content_type="text/csv")
    async with aiohttp.ClientSession() as session, session.post(host, data=data) as resp:
        return resp.status, await resp.text()


async def test_forbid_overwrite_refuses_a_second_post_object(guarded: Stack) -> None:
    """Under forbid_overwrite a second form upload to a key is 409; the pinned field is binding."""
    key = "guarded/svc-a/form.csv"
    body = {"policy": "guarded-uploads", "key": key, "content_type": "text/csv"}
    first = await guarded.post("/v1/post-policy", body)
    assert first["fields"]["x-oss-forbid-overwrite"] == "true"
    assert await _post_form(first["host"], first["fields"], b"a,b\n") == (204, "")
    second = await guarded.post("/v1/post-policy", body)
    status, text = await _post_form(second["host"], second["fields"], b"c,d\n")
    assert (status, "FileAlreadyExists" in text) == (409, True), text
    unpinned = {**second["fields"], "x-oss-forbid-overwrite": "false"}
    status, text = await _post_form(second["host"], unpinned, b"c,d\n")
    assert (status, "Policy Condition failed" in text) == (403, True), text
    assert guarded.dev.oss.read_object("examplebucket", key) == b"a,b\n"


async def test_raw_credentials_can_still_overwrite(guarded: Stack) -> None:
    """forbid_overwrite binds signed URLs and forms only: RAM has no key for vended tokens."""
    async with guarded.client.get(
        "/v1/credentials/guarded-uploads", headers=guarded.auth("svc-a")
    ) as resp:
        creds = await resp.json()
    client = _sdk(guarded, creds)
    try:
        for body in (b"first", b"second"):
            await client.put_object(
                oss.PutObjectRequest(bucket="examplebucket", key="guarded/svc-a/raw", body=body)
            )
    finally:
        await client.close()
    assert guarded.dev.oss.read_object("examplebucket", "guarded/svc-a/raw") == b"second"


async def test_presigned_get_applies_its_signed_response_overrides(guarded: Stack) -> None:
    """OSS answers a presigned GET with the overrides it was signed for, and refuses edits."""
    key = "guarded/svc-a/report.csv"
    put = await _presign_csv(guarded, key, 4)
    assert await _upload(put["url"], put["signed_headers"], b"a,b\n") == (200, "")
    overrides = {
        "response_content_disposition": 'attachment; filename="report 2026.csv"',
        "response_content_type": "text/csv; charset=utf-8",
        "response_cache_control": "private, max-age=600",
    }
    get = await guarded.post(
        "/v1/presign", {"policy": "guarded-uploads", "key": key, "method": "GET", **overrides}
    )
    status, text, headers = await _send("GET", get["url"], {})
    assert (status, text) == (200, "a,b\n")
    assert headers["content-disposition"] == overrides["response_content_disposition"]
    assert headers["content-type"] == overrides["response_content_type"]
    assert headers["cache-control"] == overrides["response_cache_control"]
    inline = get["url"].replace("attachment%3B", "inline%3B")
    assert inline != get["url"]
    status, text, _ = await _send("GET", inline, {})
    assert (status, "SignatureDoesNotMatch" in text) == (403, True), text


async def test_presigned_head_and_delete(guarded: Stack) -> None:
    """A presigned HEAD reads an object's headers; a presigned DELETE removes it."""
    key = "guarded/svc-a/old.csv"
    put = await _presign_csv(guarded, key, 4)
    assert await _upload(put["url"], put["signed_headers"], b"a,b\n") == (200, "")
    base = {"policy": "guarded-uploads", "key": key}
    head = await guarded.post("/v1/presign", {**base, "method": "HEAD"})
    status, text, headers = await _send("HEAD", head["url"], {})
    assert (status, text, headers["content-length"]) == (200, "", "4")
    assert headers["content-type"] == "text/csv"
    delete = await guarded.post("/v1/presign", {**base, "method": "DELETE"})
    status, _, _ = await _send("DELETE", delete["url"], {})
    assert status == 204
    assert guarded.dev.oss.read_object("examplebucket", key) is None
    status, _, _ = await _send("HEAD", head["url"], {})
    assert status == 404


# --- multipart_part_bytes: the assembled object is bounded too ---

_PARTED_POLICY = """\
name: parted-uploads
role_arn: acs:ram::1234567890123456:role/oss-service-uploads
bucket: examplebucket
region: cn-hangzhou
prefix: "parted/${subject}/"
actions: [put, multipart]
duration_seconds: 3600
max_url_expires_seconds: 600
max_object_bytes: 250000
multipart_part_bytes: 102400
callers: ["group:internal"]
"""


async def test_parts_signed_under_multipart_part_bytes_assemble_within_the_limit(
    stack: Stack, tmp_path: Path
) -> None:
    """250,000 bytes in 102,400-byte parts: parts 1-3 fill it exactly; more is never signed."""
    policies_dir = tmp_path / "parted"
    policies_dir.mkdir()
    (policies_dir / "parted-uploads.yaml").write_text(_PARTED_POLICY)
    stack.dev.services.policies = load_policies(policies_dir)
    base = {"policy": "parted-uploads", "key": "parted/svc-a/big.bin"}
    init = await stack.post("/v1/presign", {**base, "operation": "initiate_multipart"})
    status, text, _ = await _send("POST", init["url"], init["signed_headers"])
    assert status == 200, text
    upload_id = text.split("<UploadId>")[1].split("</UploadId>")[0]
    part = {**base, "operation": "upload_part", "upload_id": upload_id}

    async def refused(number: int, size: int) -> str:
        body = {**part, "part_number": number, "content_length": size}
        async with stack.client.post("/v1/presign", json=body, headers=stack.auth("svc-a")) as resp:
            assert resp.status == 403
            return str((await resp.json())["error"]["message"])

    assert "part 1 may be at most 102400 bytes" in await refused(1, 102_401)
    assert "part 3 may be at most 45200 bytes" in await refused(3, 45_201)
    assert "part_number 4 is past" in await refused(4, 1)
    etags = []
    for number, size in enumerate((102_400, 102_400, 45_200), start=1):
        signed = await stack.post(
            "/v1/presign", {**part, "part_number": number, "content_length": size}
        )
        data = bytes([number]) * size
        status, text, headers = await _send("PUT", signed["url"], signed["signed_headers"], data)
        assert status == 200, text
        etags.append(headers["etag"])
    await _complete(stack, base, upload_id, etags)
    stored = stack.dev.oss.read_object("examplebucket", "parted/svc-a/big.bin")
    assert stored is not None
    assert len(stored) == 250_000
