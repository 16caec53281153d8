"""oss2, V1 (``StsAuth``'s default) and V4, with broker credentials: the SDK many still run.

Each operation inside the caller's prefix succeeds; outside it the OSS emulator answers 403
AccessDenied (the token's inline policy, evaluated as RAM does).  The client is configured
only from the broker's reply: ``Oss.Endpoint`` as given (an IP-address endpoint makes oss2 use
path-style addressing on its own: ``oss2/api.py`` ``_UrlMaker`` with ``is_ip_or_localhost``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import oss2
import pytest
import requests

from tests.clients.conftest import DevServer, oss_location

OUTSIDE = "clients/someone-else/"

pytestmark = pytest.mark.parametrize("version", ["v1", "v4"])


def _bucket(dev: DevServer, version: str) -> tuple[oss2.Bucket, str]:
    """An ``oss2.Bucket`` from the broker's reply, and the caller's prefix."""
    reply = dev.credentials()
    location = oss_location(reply)
    key_id, secret, token = reply["AccessKeyId"], reply["AccessKeySecret"], reply["SecurityToken"]
    if version == "v1":
        auth: Any = oss2.StsAuth(key_id, secret, token)  # auth_version=AUTH_VERSION_1, the default
        bucket = oss2.Bucket(auth, location["Endpoint"], location["Bucket"])
    else:
        provider = oss2.credentials.StaticCredentialsProvider(key_id, secret, token)
        auth = oss2.ProviderAuthV4(provider)
        bucket = oss2.Bucket(
            auth, location["Endpoint"], location["Bucket"], region=location["Region"]
        )
    return bucket, location["Prefix"]


def _refused(call: Any, *args: Any, **kwargs: Any) -> oss2.exceptions.OssError:
    with pytest.raises(oss2.exceptions.OssError) as refused:
        call(*args, **kwargs)
    return refused.value


def _access_denied(call: Any, *args: Any, **kwargs: Any) -> None:
    err = _refused(call, *args, **kwargs)
    assert (err.status, err.code) == (403, "AccessDenied"), err


def test_put_get_head_delete_inside_the_prefix(dev: DevServer, version: str) -> None:
    """oss2 puts, gets, heads (HeadObject, GetObjectMeta) and deletes under the caller's prefix."""
    bucket, prefix = _bucket(dev, version)
    key = f"{prefix}oss2-{version}/object.txt"
    assert bucket.put_object(key, b"hello from oss2").status == 200
    assert bucket.get_object(key).read() == b"hello from oss2"
    assert bucket.head_object(key).content_length == len(b"hello from oss2")
    assert bucket.object_exists(key)  # GetObjectMeta: HEAD ?objectMeta
    assert bucket.delete_object(key).status == 204
    assert _refused(bucket.head_object, key).status == 404
    assert not bucket.object_exists(key)


def test_put_get_head_delete_outside_the_prefix_are_refused(dev: DevServer, version: str) -> None:
    """Outside the prefix put, get, delete are AccessDenied; head and object meta are 403."""
    bucket, _ = _bucket(dev, version)
    key = f"{OUTSIDE}oss2-{version}.txt"
    _access_denied(bucket.put_object, key, b"x")
    _access_denied(bucket.get_object, key)
    _access_denied(bucket.delete_object, key)
    assert _refused(bucket.head_object, key).status == 403  # HEAD: OSS sends no error body
    assert _refused(bucket.get_object_meta, key).status == 403


def test_list_objects_v1_and_v2_inside_the_prefix(dev: DevServer, version: str) -> None:
    """ListObjects (V1) and ListObjectsV2 list the caller's keys, page by page."""
    bucket, prefix = _bucket(dev, version)
    folder = f"{prefix}oss2-list-{version}/"
    keys = [f"{folder}{n}.txt" for n in range(3)]
    for key in keys:
        bucket.put_object(key, b"x")
    v1 = [item.key for item in oss2.ObjectIterator(bucket, prefix=folder, max_keys=2)]
    v2 = [item.key for item in oss2.ObjectIteratorV2(bucket, prefix=folder, max_keys=2)]
    assert v1 == v2 == keys


def test_list_objects_outside_the_prefix_is_refused(dev: DevServer, version: str) -> None:
    """Listing another caller's prefix, or the whole bucket, is AccessDenied (V1 and V2)."""
    bucket, _ = _bucket(dev, version)
    for prefix in (OUTSIDE, ""):
        _access_denied(bucket.list_objects, prefix=prefix)
        _access_denied(bucket.list_objects_v2, prefix=prefix)


def test_multipart_upload_inside_and_outside_the_prefix(dev: DevServer, version: str) -> None:
    """Multipart (initiate, parts, complete) works inside; initiating outside is AccessDenied."""
    bucket, prefix = _bucket(dev, version)
    key = f"{prefix}oss2-multipart-{version}.bin"
    parts_data = [bytes([n]) * (256 * 1024) for n in (1, 2)] + [b"tail"]
    upload_id = bucket.init_multipart_upload(key).upload_id
    parts = [
        oss2.models.PartInfo(number, bucket.upload_part(key, upload_id, number, data).etag)
        for number, data in enumerate(parts_data, start=1)
    ]
    assert bucket.complete_multipart_upload(key, upload_id, parts).status == 200
    assert bucket.get_object(key).read() == b"".join(parts_data)
    _access_denied(bucket.init_multipart_upload, f"{OUTSIDE}oss2-multipart-{version}.bin")


def test_signed_urls_inside_and_outside_the_prefix(dev: DevServer, version: str) -> None:
    """oss2's signed URLs (V1 or V4 query auth) PUT and GET inside; outside: 403 AccessDenied."""
    bucket, prefix = _bucket(dev, version)
    key = f"{prefix}oss2-signed-{version}.bin"
    data = hashlib.sha256(key.encode()).digest() * 64
    put_url = bucket.sign_url("PUT", key, 600, slash_safe=True)
    assert ("x-oss-signature=" in put_url) is (version == "v4")
    assert requests.put(put_url, data=data, timeout=10).status_code == 200
    got = requests.get(bucket.sign_url("GET", key, 600, slash_safe=True), timeout=10)
    assert (got.status_code, got.content) == (200, data)
    outside = requests.get(bucket.sign_url("GET", f"{OUTSIDE}x", 600, slash_safe=True), timeout=10)
    assert outside.status_code == 403
    assert "<Code>AccessDenied</Code>" in outside.text
