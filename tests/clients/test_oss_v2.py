"""alibabacloud-oss-v2 on its default settings, configured only from the broker's reply.

``Oss.Endpoint`` is used as given (it carries its scheme: a bare host would be read as HTTPS,
``alibabacloud_oss_v2/endpoints.py`` ``add_scheme``); an IP-address host makes the SDK use
path-style addressing on its own (``_client.py``, ``endpoints.is_ip``).  Inside the caller's
prefix every operation succeeds; outside it the emulator answers 403 AccessDenied.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from typing import Any

import alibabacloud_oss_v2 as oss
import pytest
import requests

from tests.clients.conftest import DevServer, oss_location

OUTSIDE = "clients/someone-else/"


def client_from_reply(
    reply: dict[str, Any], provider: oss.credentials.CredentialsProvider | None = None
) -> oss.Client:
    """An SDK client for the reply's OSS location; the reply's credentials unless ``provider``."""
    location = oss_location(reply)
    if provider is None:
        provider = oss.credentials.StaticCredentialsProvider(
            reply["AccessKeyId"], reply["AccessKeySecret"], reply["SecurityToken"]
        )
    config = oss.config.Config(
        region=location["Region"], endpoint=location["Endpoint"], credentials_provider=provider
    )
    return oss.Client(config)


def service_error(err: BaseException) -> oss.exceptions.ServiceError:
    """The OSS error an SDK exception wraps (``OperationError``, ``UploadError``...)."""
    seen: BaseException | None = err
    for _ in range(5):
        if isinstance(seen, oss.exceptions.ServiceError):
            return seen
        seen = seen.unwrap() if hasattr(seen, "unwrap") else None
    raise AssertionError(f"not an OSS service error: {err!r}")


def assert_access_denied(call: Callable[[], Any]) -> None:
    """``call`` fails with OSS's 403 AccessDenied."""
    with pytest.raises(oss.exceptions.BaseError) as refused:
        call()
    error = service_error(refused.value)
    assert (error.status_code, error.code) == (403, "AccessDenied"), error


@pytest.fixture
def sdk(dev: DevServer) -> tuple[oss.Client, str, str]:
    """An SDK client on the broker's credentials; the bucket and the caller's prefix."""
    reply = dev.credentials()
    location = oss_location(reply)
    return client_from_reply(reply), location["Bucket"], location["Prefix"]


def test_put_get_head_delete_inside_the_prefix(sdk: tuple[oss.Client, str, str]) -> None:
    """PutObject, GetObject, HeadObject, GetObjectMeta, DeleteObject under the prefix succeed."""
    client, bucket, prefix = sdk
    key = f"{prefix}oss-v2/object.txt"
    put = client.put_object(oss.PutObjectRequest(bucket=bucket, key=key, body=b"v2"))
    assert put.status_code == 200
    assert client.get_object(oss.GetObjectRequest(bucket=bucket, key=key)).body.read() == b"v2"
    assert client.head_object(oss.HeadObjectRequest(bucket=bucket, key=key)).content_length == 2
    assert client.is_object_exist(bucket, key)  # GetObjectMeta: HEAD ?objectMeta
    deleted = client.delete_object(oss.DeleteObjectRequest(bucket=bucket, key=key))
    assert deleted.status_code == 204
    assert not client.is_object_exist(bucket, key)


def test_put_get_head_delete_outside_the_prefix_are_refused(
    sdk: tuple[oss.Client, str, str],
) -> None:
    """Outside the prefix Put/Get/Head/DeleteObject and GetObjectMeta are AccessDenied."""
    client, bucket, _ = sdk
    key = f"{OUTSIDE}oss-v2.txt"
    assert_access_denied(
        lambda: client.put_object(oss.PutObjectRequest(bucket=bucket, key=key, body=b"x"))
    )
    assert_access_denied(lambda: client.get_object(oss.GetObjectRequest(bucket=bucket, key=key)))
    assert_access_denied(lambda: client.head_object(oss.HeadObjectRequest(bucket=bucket, key=key)))
    assert_access_denied(
        lambda: client.get_object_meta(oss.GetObjectMetaRequest(bucket=bucket, key=key))
    )
    assert_access_denied(
        lambda: client.delete_object(oss.DeleteObjectRequest(bucket=bucket, key=key))
    )


def test_list_objects_v2_paginator_inside_and_outside(sdk: tuple[oss.Client, str, str]) -> None:
    """The ListObjectsV2 paginator pages through the caller's keys; another prefix is refused."""
    client, bucket, prefix = sdk
    folder = f"{prefix}oss-v2-list/"
    keys = [f"{folder}{n}.txt" for n in range(5)]
    for key in keys:
        client.put_object(oss.PutObjectRequest(bucket=bucket, key=key, body=b"x"))
    pages = list(
        client.list_objects_v2_paginator(limit=2).iter_page(
            oss.ListObjectsV2Request(bucket=bucket, prefix=folder)
        )
    )
    assert [len(page.contents or []) for page in pages] == [2, 2, 1]
    assert [item.key for page in pages for item in page.contents or []] == keys
    for outside in (OUTSIDE, ""):
        request = oss.ListObjectsV2Request(bucket=bucket, prefix=outside)
        assert_access_denied(lambda request=request: client.list_objects_v2(request))


def test_multipart_uploader_inside_and_outside(sdk: tuple[oss.Client, str, str]) -> None:
    """The uploader sends a multipart upload under the prefix; outside it is AccessDenied."""
    client, bucket, prefix = sdk
    key = f"{prefix}oss-v2-multipart.bin"
    data = bytes(range(256)) * 4096 + b"tail"  # 1 MiB + 4 bytes: five 256 KiB parts
    uploader = client.uploader(part_size=256 * 1024, parallel_num=2)
    result = uploader.upload_from(oss.PutObjectRequest(bucket=bucket, key=key), io.BytesIO(data))
    assert result.status_code == 200
    assert result.upload_id
    assert client.get_object(oss.GetObjectRequest(bucket=bucket, key=key)).body.read() == data
    outside = oss.PutObjectRequest(bucket=bucket, key=f"{OUTSIDE}oss-v2-multipart.bin")
    assert_access_denied(lambda: uploader.upload_from(outside, io.BytesIO(data)))


def test_presigned_urls_inside_and_outside(sdk: tuple[oss.Client, str, str]) -> None:
    """The SDK's presigned PUT and GET work inside the prefix; a GET outside is AccessDenied."""
    client, bucket, prefix = sdk
    key = f"{prefix}oss-v2-presigned.txt"
    put = client.presign(oss.PutObjectRequest(bucket=bucket, key=key))
    sent = requests.put(put.url, data=b"presigned", headers=put.signed_headers, timeout=10)
    assert sent.status_code == 200, sent.text
    got = requests.get(client.presign(oss.GetObjectRequest(bucket=bucket, key=key)).url, timeout=10)
    assert (got.status_code, got.content) == (200, b"presigned")
    outside = client.presign(oss.GetObjectRequest(bucket=bucket, key=f"{OUTSIDE}x"))
    refused = requests.get(outside.url, timeout=10)
    assert refused.status_code == 403
    assert "<Code>AccessDenied</Code>" in refused.text
