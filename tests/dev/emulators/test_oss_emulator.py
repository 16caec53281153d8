"""The OSS emulator over real sockets: objects, multipart, V4 URLs, CORS, errors, the record."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import alibabacloud_oss_v2 as oss
import pytest
from alibabacloud_oss_v2.signer import SignerV4
from alibabacloud_oss_v2.types import Credentials as OssCredentials
from alibabacloud_oss_v2.types import HttpRequest, SigningContext
from yarl import URL

from broker.dev.emulators.sts import StsEmulator
from tests.conftest import FakeClock
from tests.dev.emulators.conftest import (
    BUCKET,
    REGION,
    SOURCE_KEY_ID,
    SOURCE_SECRET,
    Creds,
    Harness,
    assume_role,
    error_xml,
    in_thread,
    oss2_bucket,
    presign,
    raw,
    sdk_client,
    service_error,
    start_oss,
)


@pytest.mark.parametrize("key", ["user/alice/hello.txt", "user/alice/sp ace+plus=ü~%.txt"])
async def test_sdk_put_get_round_trip_path_style(harness: Harness, key: str) -> None:
    """PutObject then GetObject via the SDK (path style) return the bytes, type and metadata."""
    async with sdk_client(harness) as client:
        await client.put_object(
            oss.PutObjectRequest(
                bucket=BUCKET,
                key=key,
                body=b"hello oss",
                content_type="text/plain",
                metadata={"owner": "alice"},
            )
        )
        result = await client.get_object(oss.GetObjectRequest(bucket=BUCKET, key=key))
    assert result.body.content == b"hello oss"
    assert result.content_type == "text/plain"
    assert result.metadata == {"owner": "alice"}
    assert harness.emulator.read_object(BUCKET, key) == b"hello oss"
    assert (harness.storage_dir / BUCKET / key).read_bytes() == b"hello oss"


async def test_sdk_virtual_host_style_through_proxy(harness: Harness) -> None:
    """The SDK on a virtual-host endpoint, with the emulator as its proxy, round-trips an object."""
    async with sdk_client(harness, virtual_host=True) as client:
        await client.put_object(
            oss.PutObjectRequest(bucket=BUCKET, key="user/alice/v.bin", body=b"\x00v")
        )
        head = await client.head_object(
            oss.HeadObjectRequest(bucket=BUCKET, key="user/alice/v.bin")
        )
    assert head.content_length == 2
    assert harness.emulator.read_object(BUCKET, "user/alice/v.bin") == b"\x00v"


async def test_virtual_host_header_addresses_the_bucket(harness: Harness) -> None:
    """A Host of <bucket>.<ip>:<port> selects the bucket; the path is then the key."""
    async with sdk_client(harness) as client:
        await client.put_object(
            oss.PutObjectRequest(bucket=BUCKET, key="user/alice/x.txt", body=b"x")
        )
    host = f"{BUCKET}.{URL(harness.url).host}:{URL(harness.url).port}"
    status, _, body = await raw("GET", f"{harness.url}/user/alice/x.txt", headers={"Host": host})
    assert status == 403  # anonymous, but addressed: not NoSuchBucket
    assert error_xml(body)["Code"] == "AccessDenied"
    assert harness.emulator.requests[-1].bucket == BUCKET
    assert harness.emulator.requests[-1].key == "user/alice/x.txt"


async def test_tampered_secret_is_signature_does_not_match(harness: Harness) -> None:
    """A request signed with a wrong secret gets 403 SignatureDoesNotMatch; no secret echoed."""
    async with sdk_client(harness, secret="not-the-secret") as client:
        error = await service_error(
            client.put_object(
                oss.PutObjectRequest(bucket=BUCKET, key="user/alice/a.txt", body=b"a")
            )
        )
    assert (error.status_code, error.code) == (403, "SignatureDoesNotMatch")
    fields = error.error_fileds
    assert fields["OSSAccessKeyId"] == harness.creds.access_key_id
    assert fields["CanonicalRequest"].startswith("PUT\n/examplebucket/user/alice/a.txt\n")
    assert fields["StringToSign"].startswith("OSS4-HMAC-SHA256\n")
    assert harness.creds.access_key_secret.encode() not in error.snapshot
    assert harness.emulator.read_object(BUCKET, "user/alice/a.txt") is None


async def test_key_outside_policy_is_access_denied(harness: Harness) -> None:
    """Writing outside the token's inline policy prefix gets 403 AccessDenied (STS policy)."""
    async with sdk_client(harness) as client:
        error = await service_error(
            client.put_object(oss.PutObjectRequest(bucket=BUCKET, key="user/bob/a.txt", body=b"a"))
        )
    assert (error.status_code, error.code, error.ec) == (403, "AccessDenied", "0003-00000301")
    assert error.message == "Access denied by authorizer's policy."
    assert harness.emulator.requests[-1].error_code == "AccessDenied"


async def test_explicit_deny_wins_over_allow(harness: Harness) -> None:
    """A Deny statement blocks a key an Allow statement covers."""
    async with sdk_client(harness) as client:
        error = await service_error(
            client.put_object(
                oss.PutObjectRequest(bucket=BUCKET, key="user/alice/private/k", body=b"k")
            )
        )
    assert error.code == "AccessDenied"
    assert b"<NoPermissionType>ExplicitDeny</NoPermissionType>" in error.snapshot


async def test_expired_sts_token_is_security_token_expired(harness: Harness) -> None:
    """Credentials whose STS token has expired get 403 SecurityTokenExpired."""
    harness.sts.faults.expired_credentials = True
    expired = await assume_role(harness.sts_url)
    async with sdk_client(harness, creds=expired) as client:
        error = await service_error(
            client.put_object(
                oss.PutObjectRequest(bucket=BUCKET, key="user/alice/a.txt", body=b"a")
            )
        )
    assert (error.status_code, error.code) == (403, "SecurityTokenExpired")
    assert error.message == "The security token you provided has expired."


@pytest.mark.parametrize("change", ["access_key_id", "security_token"])
async def test_unknown_key_or_token_is_invalid_access_key_id(harness: Harness, change: str) -> None:
    """A key id the token was not issued for, or a token STS never issued: InvalidAccessKeyId."""
    values = vars(harness.creds) | {change: "STS.NotIssuedByTheEmulator"}
    async with sdk_client(harness, creds=Creds(**values)) as client:
        error = await service_error(
            client.put_object(
                oss.PutObjectRequest(bucket=BUCKET, key="user/alice/a.txt", body=b"a")
            )
        )
    assert (error.status_code, error.code) == (403, "InvalidAccessKeyId")


async def test_forbid_overwrite_is_file_already_exists(harness: Harness) -> None:
    """x-oss-forbid-overwrite: true on an existing key gets 409 FileAlreadyExists; it stays."""
    key = "user/alice/once.txt"
    async with sdk_client(harness) as client:
        await client.put_object(
            oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"first", forbid_overwrite=True)
        )
        error = await service_error(
            client.put_object(
                oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"second", forbid_overwrite=True)
            )
        )
    assert (error.status_code, error.code) == (409, "FileAlreadyExists")
    assert harness.emulator.read_object(BUCKET, key) == b"first"


async def test_delete_then_get_is_no_such_key(harness: Harness) -> None:
    """DeleteObject removes the object; GetObject and HeadObject then get 404 NoSuchKey."""
    key = "user/alice/gone.txt"
    async with sdk_client(harness) as client:
        await client.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"x"))
        await client.delete_object(oss.DeleteObjectRequest(bucket=BUCKET, key=key))
        get_error = await service_error(
            client.get_object(oss.GetObjectRequest(bucket=BUCKET, key=key))
        )
        head_error = await service_error(
            client.head_object(oss.HeadObjectRequest(bucket=BUCKET, key=key))
        )
    assert (get_error.status_code, get_error.code) == (404, "NoSuchKey")
    assert (head_error.status_code, head_error.code) == (404, "NoSuchKey")
    assert not (harness.storage_dir / BUCKET / "user").exists()


async def test_get_object_meta_answers_size_and_etag_or_no_such_key(harness: Harness) -> None:
    """GetObjectMeta (HEAD ?objectMeta, the SDKs' exists check) gives size and ETag, or 404."""
    key = "user/alice/meta.txt"
    async with sdk_client(harness) as client:
        put = await client.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"12345"))
        meta = await client.get_object_meta(oss.GetObjectMetaRequest(bucket=BUCKET, key=key))
        assert await client.is_object_exist(BUCKET, key)
        assert not await client.is_object_exist(BUCKET, "user/alice/none.txt")
    assert (meta.content_length, meta.etag) == (5, put.etag)


async def test_multipart_three_parts_assembled_byte_exactly(harness: Harness) -> None:
    """Three parts uploaded through the SDK are assembled in part order, byte for byte."""
    key = "user/alice/big.bin"
    parts = [os.urandom(100 * 1024), os.urandom(100 * 1024 + 3), b"tail"]
    async with sdk_client(harness) as client:
        init = await client.initiate_multipart_upload(
            oss.InitiateMultipartUploadRequest(
                bucket=BUCKET, key=key, content_type="application/x-big"
            )
        )
        uploaded = []
        for number in (2, 1, 3):  # out of order on purpose
            result = await client.upload_part(
                oss.UploadPartRequest(
                    bucket=BUCKET,
                    key=key,
                    upload_id=init.upload_id,
                    part_number=number,
                    body=parts[number - 1],
                )
            )
            uploaded.append(oss.UploadPart(part_number=number, etag=result.etag))
        uploaded.sort(key=lambda part: part.part_number)
        done = await client.complete_multipart_upload(
            oss.CompleteMultipartUploadRequest(
                bucket=BUCKET,
                key=key,
                upload_id=init.upload_id,
                complete_multipart_upload=oss.CompleteMultipartUpload(parts=uploaded),
            )
        )
        got = await client.get_object(oss.GetObjectRequest(bucket=BUCKET, key=key))
    assert harness.emulator.read_object(BUCKET, key) == b"".join(parts)
    assert got.body.content == b"".join(parts)
    assert got.content_type == "application/x-big"
    assert str(done.etag).endswith('-3"')


async def test_multipart_wrong_etag_is_invalid_part(harness: Harness) -> None:
    """CompleteMultipartUpload naming a part with the wrong ETag gets 400 InvalidPart."""
    key = "user/alice/bad.bin"
    async with sdk_client(harness) as client:
        init = await client.initiate_multipart_upload(
            oss.InitiateMultipartUploadRequest(bucket=BUCKET, key=key)
        )
        await client.upload_part(
            oss.UploadPartRequest(
                bucket=BUCKET, key=key, upload_id=init.upload_id, part_number=1, body=b"x"
            )
        )
        error = await service_error(
            client.complete_multipart_upload(
                oss.CompleteMultipartUploadRequest(
                    bucket=BUCKET,
                    key=key,
                    upload_id=init.upload_id,
                    complete_multipart_upload=oss.CompleteMultipartUpload(
                        parts=[
                            oss.UploadPart(part_number=1, etag='"0123456789ABCDEF0123456789ABCDEF"')
                        ]
                    ),
                )
            )
        )
    assert (error.status_code, error.code) == (400, "InvalidPart")


async def test_multipart_abort_forgets_the_upload(harness: Harness) -> None:
    """AbortMultipartUpload drops the upload: parts are gone, later calls get NoSuchUpload."""
    key = "user/alice/aborted.bin"
    async with sdk_client(harness) as client:
        init = await client.initiate_multipart_upload(
            oss.InitiateMultipartUploadRequest(bucket=BUCKET, key=key)
        )
        await client.upload_part(
            oss.UploadPartRequest(
                bucket=BUCKET, key=key, upload_id=init.upload_id, part_number=1, body=b"x"
            )
        )
        await client.abort_multipart_upload(
            oss.AbortMultipartUploadRequest(bucket=BUCKET, key=key, upload_id=init.upload_id)
        )
        error = await service_error(
            client.upload_part(
                oss.UploadPartRequest(
                    bucket=BUCKET, key=key, upload_id=init.upload_id, part_number=2, body=b"y"
                )
            )
        )
    assert (error.status_code, error.code) == (404, "NoSuchUpload")
    assert harness.emulator.read_object(BUCKET, key) is None
    assert [r.operation for r in harness.emulator.requests][-2:] == [
        "AbortMultipartUpload",
        "UploadPart",
    ]


async def test_presigned_put_and_get_urls_work_with_plain_http(harness: Harness) -> None:
    """The SDK's presign() URLs for PUT (Content-Type signed) and GET work from aiohttp."""
    key = "user/alice/presigned.txt"
    put = await presign(
        harness, oss.PutObjectRequest(bucket=BUCKET, key=key, content_type="text/plain")
    )
    assert put.signed_headers == {"Content-Type": "text/plain"}
    status, _, _ = await raw(
        "PUT", URL(put.url, encoded=True), data=b"via url", headers=put.signed_headers
    )
    assert status == 200
    get = await presign(harness, oss.GetObjectRequest(bucket=BUCKET, key=key))
    status, headers, body = await raw("GET", URL(get.url, encoded=True))
    assert (status, body, headers["Content-Type"]) == (200, b"via url", "text/plain")


async def test_presigned_put_with_another_content_type_is_rejected(harness: Harness) -> None:
    """A presigned PUT sent with another Content-Type than the signed one: SignatureDoesNotMatch."""
    put = await presign(
        harness,
        oss.PutObjectRequest(bucket=BUCKET, key="user/alice/t.txt", content_type="text/plain"),
    )
    status, headers, body = await raw(
        "PUT", URL(put.url, encoded=True), data=b"<html>", headers={"Content-Type": "text/html"}
    )
    assert status == 403
    assert error_xml(body)["Code"] == "SignatureDoesNotMatch"
    assert headers["x-oss-ec"] == "0002-00000201"
    assert harness.emulator.read_object(BUCKET, "user/alice/t.txt") is None


async def test_presigned_url_for_another_key_is_rejected(harness: Harness) -> None:
    """A presigned URL whose path is changed to another key gets 403 SignatureDoesNotMatch."""
    put = await presign(harness, oss.PutObjectRequest(bucket=BUCKET, key="user/alice/a.txt"))
    other = put.url.replace("/user/alice/a.txt?", "/user/alice/b.txt?")
    status, _, body = await raw(
        "PUT", URL(other, encoded=True), data=b"x", skip_auto_headers=["Content-Type"]
    )
    assert status == 403
    assert error_xml(body)["Code"] == "SignatureDoesNotMatch"


async def test_expired_presigned_url_is_access_denied(harness: Harness) -> None:
    """Past x-oss-date + x-oss-expires on the injected clock: 403 "Request has expired."."""
    get = await presign(
        harness, oss.GetObjectRequest(bucket=BUCKET, key="user/alice/a.txt"), seconds=60
    )
    harness.clock.advance(61)
    status, headers, body = await raw("GET", URL(get.url, encoded=True))
    fields = error_xml(body)
    assert (status, fields["Code"], fields["Message"]) == (
        403,
        "AccessDenied",
        "Request has expired.",
    )
    assert fields["EC"] == "0002-00000069"
    assert {"Expires", "ServerTime", "RequestId", "HostId"} <= fields.keys()
    assert headers["x-oss-request-id"] == fields["RequestId"]


async def test_presigned_url_dated_beyond_the_skew_is_rejected(harness: Harness) -> None:
    """A URL whose x-oss-date is more than 15 minutes ahead of the server clock is refused."""
    get = await presign(harness, oss.GetObjectRequest(bucket=BUCKET, key="user/alice/a.txt"))
    harness.clock.advance(-1000)
    status, _, body = await raw("GET", URL(get.url, encoded=True))
    assert (status, error_xml(body)["Code"]) == (403, "RequestTimeTooSkewed")


def official_sign(
    h: Harness,
    method: str,
    key: str,
    headers: dict[str, str],
    *,
    query: bool,
    additional: frozenset[str] = frozenset({"cache-control"}),
) -> tuple[str, dict[str, str]]:
    """Sign with the SDK's own SignerV4, Cache-Control (or ``additional``) also signed."""
    request = HttpRequest(method, f"{h.url}/{BUCKET}/{key}", headers=dict(headers))
    credentials = OssCredentials(
        h.creds.access_key_id, h.creds.access_key_secret, h.creds.security_token
    )
    context = SigningContext(
        product="oss",
        region=REGION,
        bucket=BUCKET,
        key=key,
        request=request,
        credentials=credentials,
        additional_headers=set(additional),
    )
    context.auth_method_query = query
    SignerV4().sign(context)
    return request.url, dict(request.headers)


@pytest.mark.parametrize("query", [True, False], ids=["url", "header"])
async def test_additional_headers_are_signed(harness: Harness, query: bool) -> None:
    """A header named in the additional headers is signed: the same value passes, another fails."""
    key = "user/alice/cached.txt"
    url, headers = official_sign(harness, "PUT", key, {"Cache-Control": "no-cache"}, query=query)
    assert ("x-oss-additional-headers=cache-control" in url) == query
    send = {"skip_auto_headers": ["Content-Type"], "data": b"c"}
    changed = headers | {"Cache-Control": "max-age=60"}
    bad_status, _, body = await raw("PUT", URL(url, encoded=True), headers=changed, **send)
    ok_status, _, _ = await raw("PUT", URL(url, encoded=True), headers=headers, **send)
    assert (bad_status, error_xml(body)["Code"]) == (403, "SignatureDoesNotMatch")
    assert ok_status == 200
    assert harness.emulator.read_object(BUCKET, key) == b"c"


async def test_cors_preflight_from_allowed_origin(harness: Harness) -> None:
    """A preflight from an allowed origin echoes the origin, methods and requested headers."""
    status, headers, _ = await raw(
        "OPTIONS",
        f"{harness.url}/{BUCKET}/user/alice/a.txt",
        headers={
            "Origin": "https://app.example.com",
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "content-type,x-oss-meta-owner",
        },
    )
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.com"
    assert "PUT" in headers["Access-Control-Allow-Methods"]
    assert headers["Access-Control-Allow-Headers"] == "content-type,x-oss-meta-owner"
    assert "ETag" in headers["Access-Control-Expose-Headers"]
    assert "x-oss-request-id" in headers["Access-Control-Expose-Headers"]


async def test_cors_origin_not_allowed(clock: FakeClock, tmp_path: Path) -> None:
    """A preflight from an origin not in cors_allow_origins: 403 AccessForbidden, no CORS."""
    sts = StsEmulator(access_keys={SOURCE_KEY_ID: SOURCE_SECRET}, clock=clock)
    _, runner, url = await start_oss(
        sts, clock, tmp_path, cors_allow_origins=["https://*.example.com"]
    )
    try:
        headers = {"Origin": "https://evil.test", "Access-Control-Request-Method": "PUT"}
        status, got, body = await raw("OPTIONS", f"{url}/{BUCKET}/k", headers=headers)
        ok_status, ok_headers, _ = await raw(
            "OPTIONS", f"{url}/{BUCKET}/k", headers=headers | {"Origin": "https://a.example.com"}
        )
    finally:
        await runner.cleanup()
    assert (status, error_xml(body)["Code"]) == (403, "AccessForbidden")
    assert "Access-Control-Allow-Origin" not in got
    assert (ok_status, ok_headers["Access-Control-Allow-Origin"]) == (200, "https://a.example.com")


async def test_cors_headers_on_actual_responses(harness: Harness) -> None:
    """Responses to requests with an allowed Origin, errors included, carry CORS headers."""
    status, headers, _ = await raw(
        "GET",
        f"{harness.url}/{BUCKET}/user/alice/a.txt",
        headers={"Origin": "http://localhost:5173"},
    )
    assert status == 403
    assert headers["Access-Control-Allow-Origin"] == "http://localhost:5173"


@pytest.mark.parametrize(
    "path",
    [
        "/examplebucket/user/alice/../../../escape.txt",
        "/examplebucket/user/alice/%2E%2E/%2E%2E/escape.txt",
        "/examplebucket//etc/escape.txt",
        "/examplebucket/user/alice/./a.txt",
        "/examplebucket/user/alice%5C..%5Cescape.txt",
    ],
)
async def test_path_traversal_keys_are_refused(harness: Harness, path: str) -> None:
    """Keys with .., ., empty segments, a leading / or backslashes get 400 InvalidObjectName."""
    status, _, body = await raw("PUT", URL(f"{harness.url}{path}", encoded=True), data=b"x")
    assert (status, error_xml(body)["Code"]) == (400, "InvalidObjectName")
    assert not list(harness.storage_dir.parent.rglob("escape.txt"))


@pytest.mark.parametrize(
    ("method", "path", "headers", "status", "code"),
    [
        ("GET", "/nosuchbucket/k", {}, 404, "NoSuchBucket"),
        ("GET", "/examplebucket/user/alice/a.txt", {}, 403, "AccessDenied"),
        (
            "GET",
            "/examplebucket/user/alice/a.txt",
            {"Authorization": "OSS4-HMAC-SHA256 garbage"},
            400,
            "InvalidArgument",
        ),
        (
            "GET",
            "/examplebucket/k?x-oss-signature-version=OSS4-HMAC-SHA256&x-oss-date=yesterday",
            {},
            400,
            "InvalidArgument",
        ),
        (
            "GET",
            "/examplebucket/k?x-oss-signature-version=OSS4-HMAC-SHA256&x-oss-credential=a%2Fb&x-oss-date=20250101T000000Z&x-oss-expires=60&x-oss-signature=00",
            {},
            400,
            "InvalidArgument",
        ),
        (
            "GET",
            "/examplebucket/k?x-oss-signature-version=OSS4-HMAC-SHA256&x-oss-credential=AK%2F20250101%2Fcn-hangzhou%2Foss%2Faliyun_v4_request&x-oss-date=20250101T000000Z&x-oss-expires=99999999&x-oss-signature=00",
            {},
            400,
            "InvalidArgument",
        ),
        ("POST", "/examplebucket/", {"Content-Type": "text/plain"}, 400, "MalformedPOSTRequest"),
        (
            "POST",
            "/examplebucket/",
            {"Content-Type": "multipart/form-data; boundary=zz"},
            400,
            "MalformedPOSTRequest",
        ),
        ("GET", "/examplebucket/?list-type=3", {}, 400, "InvalidArgument"),
        ("GET", "/examplebucket/k", {"Authorization": "Bearer abc"}, 400, "InvalidArgument"),
        ("GET", "/examplebucket/%FF%FE", {}, 400, "InvalidArgument"),
        ("PUT", "/examplebucket/k", {"Content-MD5": "not base64!"}, 400, "InvalidDigest"),
    ],
)
async def test_malformed_requests_get_xml_errors(
    harness: Harness, method: str, path: str, headers: dict[str, str], status: int, code: str
) -> None:
    """Malformed or unauthenticated input gets an OSS XML error and the right status."""
    got_status, got_headers, body = await raw(
        method, URL(f"{harness.url}{path}", encoded=True), headers=headers, data=b"--zz\r\ngarbage"
    )
    fields = error_xml(body)
    assert (got_status, fields["Code"]) == (status, code), fields
    assert got_headers["x-oss-request-id"] == fields["RequestId"]
    assert harness.emulator.requests[-1].status == status


@pytest.mark.parametrize(
    ("method", "path", "headers"),
    [
        ("PUT", "/examplebucket/k?acl", {}),
        ("PUT", "/examplebucket/", {}),
        ("DELETE", "/examplebucket/", {}),
        ("GET", "/", {}),
        ("GET", "/examplebucket/?uploads", {}),
        ("GET", "/examplebucket/k?versionId=1", {}),
        ("GET", "/examplebucket/k?x-oss-process=image/resize,w_10", {}),
        ("POST", "/examplebucket/k?append&position=0", {}),
        ("POST", "/examplebucket/?delete", {}),
        ("POST", "/examplebucket/k", {}),
        ("PATCH", "/examplebucket/k", {}),
        ("GET", "/examplebucket/k", {"Authorization": "OSS2 AccessKeyId:a,Signature:b"}),
    ],
    ids=[
        "put-acl",
        "put-bucket",
        "delete-bucket",
        "list-buckets",
        "list-uploads",
        "version",
        "image-process",
        "append",
        "delete-multiple",
        "post-to-key",
        "patch",
        "signature-v2",
    ],
)
async def test_unsupported_operations_are_not_implemented(
    harness: Harness, method: str, path: str, headers: dict[str, str]
) -> None:
    """An API or feature the emulator lacks is OSS's 501 NotImplemented XML error, never 405."""
    status, got_headers, body = await raw(
        method, URL(f"{harness.url}{path}", encoded=True), headers=headers, data=b"x"
    )
    fields = error_xml(body)
    assert (status, fields["Code"]) == (501, "NotImplemented"), fields
    assert {"Message", "RequestId", "HostId"} <= fields.keys()
    assert got_headers["x-oss-request-id"] == fields["RequestId"]


async def test_requests_are_recorded(harness: Harness) -> None:
    """Every request is recorded with method, bucket, key, operation, status and error code."""
    async with sdk_client(harness) as client:
        await client.put_object(
            oss.PutObjectRequest(bucket=BUCKET, key="user/alice/r.txt", body=b"r")
        )
        await service_error(
            client.get_object(oss.GetObjectRequest(bucket=BUCKET, key="user/alice/none"))
        )
    first, second = harness.emulator.requests[-2:]
    assert (
        first.method,
        first.bucket,
        first.key,
        first.operation,
        first.status,
        first.error_code,
    ) == (
        "PUT",
        BUCKET,
        "user/alice/r.txt",
        "PutObject",
        200,
        None,
    )
    assert (second.operation, second.status, second.error_code) == ("GetObject", 404, "NoSuchKey")


async def test_put_stores_standard_headers_and_acl_returned_by_get(harness: Harness) -> None:
    """PutObject keeps Content-Disposition, Cache-Control and x-oss-object-acl; GET returns them."""
    key = "user/alice/doc.pdf"
    async with sdk_client(harness) as client:
        await client.put_object(
            oss.PutObjectRequest(
                bucket=BUCKET,
                key=key,
                body=b"%PDF",
                content_disposition='inline; filename="doc.pdf"',
                cache_control="max-age=60",
                acl="private",
            )
        )
        got = await client.get_object(oss.GetObjectRequest(bucket=BUCKET, key=key))
    assert (got.content_disposition, got.cache_control) == (
        'inline; filename="doc.pdf"',
        "max-age=60",
    )
    stored = harness.emulator.object_attributes(BUCKET, key)
    assert stored is not None
    assert stored.acl == "private"


async def test_presigned_get_response_overrides_are_applied_and_signed(harness: Harness) -> None:
    """response-content-disposition/-type/-cache-control in a V4 URL set headers; edits fail."""
    key = "user/alice/photo.jpg"
    async with sdk_client(harness) as client:
        await client.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"jpg"))
    get = await presign(
        harness,
        oss.GetObjectRequest(
            bucket=BUCKET,
            key=key,
            response_content_disposition='attachment; filename="p.jpg"',
            response_content_type="image/jpeg",
            response_cache_control="no-store",
        ),
    )
    status, headers, body = await raw("GET", URL(get.url, encoded=True))
    assert (status, body) == (200, b"jpg")
    assert headers["Content-Disposition"] == 'attachment; filename="p.jpg"'
    assert (headers["Content-Type"], headers["Cache-Control"]) == ("image/jpeg", "no-store")
    tampered = get.url.replace("image%2Fjpeg", "text%2Fhtml")
    assert tampered != get.url
    bad_status, _, bad_body = await raw("GET", URL(tampered, encoded=True))
    assert (bad_status, error_xml(bad_body)["Code"]) == (403, "SignatureDoesNotMatch")


async def test_forbid_overwrite_on_complete_multipart_upload(harness: Harness) -> None:
    """CompleteMultipartUpload with x-oss-forbid-overwrite onto an existing key: 409, kept."""
    key = "user/alice/once.bin"
    async with sdk_client(harness) as client:
        await client.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"first"))
        init = await client.initiate_multipart_upload(
            oss.InitiateMultipartUploadRequest(bucket=BUCKET, key=key)
        )
        part = await client.upload_part(
            oss.UploadPartRequest(
                bucket=BUCKET, key=key, upload_id=init.upload_id, part_number=1, body=b"second"
            )
        )
        error = await service_error(
            client.complete_multipart_upload(
                oss.CompleteMultipartUploadRequest(
                    bucket=BUCKET,
                    key=key,
                    upload_id=init.upload_id,
                    forbid_overwrite=True,
                    complete_multipart_upload=oss.CompleteMultipartUpload(
                        parts=[oss.UploadPart(part_number=1, etag=part.etag)]
                    ),
                )
            )
        )
    assert (error.status_code, error.code, error.ec) == (409, "FileAlreadyExists", "0042-00000214")
    assert harness.emulator.read_object(BUCKET, key) == b"first"


async def test_forbid_overwrite_must_be_true_or_false(harness: Harness) -> None:
    """A signed x-oss-forbid-overwrite: abc is 400 InvalidArgument with EC 0017-00000279."""
    headers = {"x-oss-forbid-overwrite": "abc"}
    url, signed = official_sign(harness, "PUT", "user/alice/f", headers, query=False)
    status, _, body = await raw(
        "PUT", URL(url, encoded=True), data=b"f", headers=signed, skip_auto_headers=["Content-Type"]
    )
    error = error_xml(body)
    assert (status, error["Code"], error["EC"]) == (400, "InvalidArgument", "0017-00000279")
    assert harness.emulator.read_object(BUCKET, "user/alice/f") is None


async def test_forbid_overwrite_on_initiate_multipart_upload(harness: Harness) -> None:
    """InitiateMultipartUpload with x-oss-forbid-overwrite onto an existing key: 409 at once."""
    key = "user/alice/exists.bin"
    async with sdk_client(harness) as client:
        await client.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"first"))
        error = await service_error(
            client.initiate_multipart_upload(
                oss.InitiateMultipartUploadRequest(bucket=BUCKET, key=key, forbid_overwrite=True)
            )
        )
    assert (error.status_code, error.code, error.ec) == (409, "FileAlreadyExists", "0026-00000003")


async def test_signed_content_length_takes_exactly_that_many_bytes(harness: Harness) -> None:
    """A URL whose additional headers sign Content-Length: 5 takes 5 bytes, not 6, not chunked."""
    key = "user/alice/five.bin"
    headers = {"Content-Length": "5"}
    url, _ = official_sign(
        harness, "PUT", key, headers, query=True, additional=frozenset({"content-length"})
    )
    assert "x-oss-additional-headers=content-length" in url
    target = URL(url, encoded=True)
    send = {"skip_auto_headers": ["Content-Type"]}
    status, _, body = await raw("PUT", target, data=b"123456", **send)
    assert (status, error_xml(body)["Code"]) == (403, "SignatureDoesNotMatch")

    async def chunks() -> AsyncIterator[bytes]:
        yield b"12345"

    status, _, body = await raw("PUT", target, data=chunks(), **send)
    assert (status, error_xml(body)["Code"]) == (403, "SignatureDoesNotMatch")
    assert harness.emulator.read_object(BUCKET, key) is None
    status, _, _ = await raw("PUT", target, data=b"12345", **send)
    assert status == 200
    assert harness.emulator.read_object(BUCKET, key) == b"12345"


async def test_presigned_head_answers_headers_without_a_body(harness: Harness) -> None:
    """The SDK's presigned HEAD gets the object's length, type and ETag, and no body."""
    key = "user/alice/head.txt"
    async with sdk_client(harness) as client:
        put = await client.put_object(
            oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"12345", content_type="text/csv")
        )
    head = await presign(harness, oss.HeadObjectRequest(bucket=BUCKET, key=key))
    assert head.method == "HEAD"
    status, headers, body = await raw("HEAD", URL(head.url, encoded=True))
    assert (status, body, headers["Content-Length"]) == (200, b"", "5")
    assert (headers["Content-Type"], headers["ETag"]) == ("text/csv", put.etag)


async def test_oss2_presigned_delete_removes_the_object(harness: Harness) -> None:
    """oss2's V4 sign_url('DELETE') URL deletes the object (204); the object is gone."""
    key = "user/alice/gone.txt"
    async with sdk_client(harness) as client:
        await client.put_object(oss.PutObjectRequest(bucket=BUCKET, key=key, body=b"x"))
    url = await in_thread(lambda: oss2_bucket(harness, v4=True).sign_url("DELETE", key, 60))
    status, _, _ = await raw("DELETE", URL(url, encoded=True))
    assert status == 204
    assert harness.emulator.read_object(BUCKET, key) is None
    assert harness.emulator.requests[-1].operation == "DeleteObject"
