"""ListObjects V1 and V2 at the OSS emulator: oss2, alibabacloud-oss-v2, the XML, the policy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from urllib.parse import quote, urlencode
from xml.etree import ElementTree

import alibabacloud_oss_v2 as oss
import pytest
from alibabacloud_oss_v2.signer import SignerV4
from alibabacloud_oss_v2.types import Credentials as OssCredentials
from alibabacloud_oss_v2.types import HttpRequest, SigningContext
from yarl import URL

from tests.dev.emulators.conftest import (
    ACCOUNT,
    BUCKET,
    REGION,
    Harness,
    error_xml,
    in_thread,
    oss2_bucket,
    oss2_error,
    raw,
    sdk_client,
    service_error,
)

KEYS = [
    "user/alice/a.txt",
    "user/alice/b c+d ü.txt",
    "user/alice/photos/1.png",
    "user/alice/photos/2.png",
    "user/alice/z/deep/x.bin",
]


def list_url(h: Harness, query: dict[str, str]) -> str:
    """A bucket-level GET URL presigned by the SDK's own SignerV4 (oss2 presigns keys only)."""
    request = HttpRequest("GET", f"{h.url}/{BUCKET}/?{urlencode(query, quote_via=quote)}")
    credentials = OssCredentials(
        h.creds.access_key_id, h.creds.access_key_secret, h.creds.security_token
    )
    context = SigningContext(
        product="oss", region=REGION, bucket=BUCKET, request=request, credentials=credentials
    )
    context.auth_method_query = True
    context.expiration_time = datetime.now(UTC) + timedelta(seconds=60)
    SignerV4().sign(context)
    return request.url


@pytest.fixture
async def listed(harness: Harness) -> Harness:
    """The harness with KEYS uploaded through oss2 (V1)."""
    bucket = oss2_bucket(harness)
    for key in KEYS:
        await in_thread(lambda key=key: bucket.put_object(key, key.encode()))
    return harness


async def test_oss2_v1_list_with_delimiter_and_url_encoding(listed: Harness) -> None:
    """oss2 list_objects (encoding-type=url): keys decoded, folders as common prefixes, owner."""
    bucket = oss2_bucket(listed)
    result = await in_thread(lambda: bucket.list_objects(prefix="user/alice/", delimiter="/"))
    assert [item.key for item in result.object_list] == KEYS[:2]
    assert result.prefix_list == ["user/alice/photos/", "user/alice/z/"]
    assert result.is_truncated is False
    first = result.object_list[0]
    assert (first.size, first.type, first.storage_class) == (16, "Normal", "Standard")
    assert (first.owner.id, first.owner.display_name) == (ACCOUNT, ACCOUNT)


async def test_oss2_v2_pages_with_continuation_tokens(listed: Harness) -> None:
    """oss2 list_objects_v2 with max_keys=2 walks every key in order across three pages."""
    bucket = oss2_bucket(listed)
    seen: list[str] = []
    token = ""
    for _ in range(5):  # bounded: 5 keys, 2 a page
        page = await in_thread(
            lambda token=token: bucket.list_objects_v2(
                prefix="user/alice/", continuation_token=token, max_keys=2
            )
        )
        seen += [item.key for item in page.object_list]
        assert all(item.owner is None for item in page.object_list)
        if not page.is_truncated:
            break
        token = page.next_continuation_token
    assert seen == KEYS


async def test_oss2_v2_fetch_owner_and_start_after(listed: Harness) -> None:
    """fetch_owner=True adds Owner; start_after skips up to and including that key."""
    bucket = oss2_bucket(listed)
    page = await in_thread(
        lambda: bucket.list_objects_v2(prefix="user/alice/", start_after=KEYS[2], fetch_owner=True)
    )
    assert [item.key for item in page.object_list] == KEYS[3:]
    assert page.object_list[0].owner.id == ACCOUNT


async def test_oss2_v4_lists_too(listed: Harness) -> None:
    """oss2 with V4 signing lists the same keys."""
    bucket = oss2_bucket(listed, v4=True)
    result = await in_thread(lambda: bucket.list_objects_v2(prefix="user/alice/photos/"))
    assert [item.key for item in result.object_list] == KEYS[2:4]


@pytest.mark.parametrize("virtual_host", [False, True], ids=["path", "virtual-host"])
async def test_alibabacloud_oss_v2_paginator_lists_everything(
    listed: Harness, virtual_host: bool
) -> None:
    """The official V2 paginator (limit 2), path style and virtual-host, sees every key once."""
    seen: list[str] = []
    async with sdk_client(listed, virtual_host=virtual_host) as client:
        paginator = client.list_objects_v2_paginator(limit=2)
        request = oss.ListObjectsV2Request(bucket=BUCKET, prefix="user/alice/")
        async for page in paginator.iter_page(request):
            seen += [item.key for item in page.contents or []]
            assert page.key_count == len(page.contents or [])
    assert seen == KEYS


async def test_alibabacloud_oss_v2_v1_list_with_marker(listed: Harness) -> None:
    """ListObjects (V1) with a delimiter and max_keys=2: NextMarker resumes after a folder."""
    request = oss.ListObjectsRequest(bucket=BUCKET, prefix="user/alice/", delimiter="/", max_keys=3)
    async with sdk_client(listed) as client:
        first = await client.list_objects(request)
        request.marker = first.next_marker
        second = await client.list_objects(request)
    names = [item.key for item in first.contents or []]
    folders = [item.prefix for item in first.common_prefixes or []]
    assert (names, folders, first.next_marker) == (KEYS[:2], ["user/alice/photos/"], folders[0])
    assert [item.prefix for item in second.common_prefixes or []] == ["user/alice/z/"]
    assert (second.contents or [], second.is_truncated) == ([], False)


@pytest.mark.parametrize(
    "prefix", ["user/bob/", "", "user/"], ids=["sibling", "no-prefix", "parent"]
)
async def test_listing_outside_the_policy_prefix_is_denied(listed: Harness, prefix: str) -> None:
    """The oss:Prefix condition: listing a sibling, the whole bucket or a parent is AccessDenied."""
    async with sdk_client(listed) as client:
        error = await service_error(
            client.list_objects_v2(oss.ListObjectsV2Request(bucket=BUCKET, prefix=prefix))
        )
    assert (error.status_code, error.code, error.ec) == (403, "AccessDenied", "0003-00000301")
    assert b"<AuthAction>oss:ListObjects</AuthAction>" in error.snapshot


async def test_oss2_listing_without_a_prefix_is_denied(listed: Harness) -> None:
    """oss2's default list_objects (prefix='') is outside a prefix-bound grant."""
    error = await oss2_error(lambda: oss2_bucket(listed).list_objects())
    assert (error.status, error.code) == (403, "AccessDenied")


async def test_v2_xml_shape(listed: Harness) -> None:
    """V2 XML: Name, Prefix, MaxKeys, KeyCount, NextContinuationToken; no Owner by default."""
    url = list_url(listed, {"list-type": "2", "prefix": "user/alice/", "max-keys": "1"})
    status, headers, body = await raw("GET", URL(url, encoded=True))
    root = ElementTree.fromstring(body)  # noqa: S314 - the emulator's own reply
    assert (status, headers["Content-Type"], root.tag) == (
        200,
        "application/xml",
        "ListBucketResult",
    )
    assert [root.findtext(tag) for tag in ("Name", "Prefix", "MaxKeys", "KeyCount")] == [
        BUCKET,
        "user/alice/",
        "1",
        "1",
    ]
    assert root.findtext("IsTruncated") == "true"
    assert root.findtext("NextContinuationToken")
    assert root.find("EncodingType") is None
    assert root.find("Contents/Owner") is None
    assert root.findtext("Contents/ETag", "").startswith('"')


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"list-type": "2", "max-keys": "0"}, "InvalidArgument"),
        ({"list-type": "2", "max-keys": "1001"}, "InvalidArgument"),
        ({"list-type": "2", "continuation-token": "%%%"}, "InvalidArgument"),
        ({"encoding-type": "xml"}, "InvalidArgument"),
    ],
    ids=["max-keys-0", "max-keys-1001", "token", "encoding"],
)
async def test_bad_list_parameters_are_invalid_argument(
    listed: Harness, params: dict[str, str], code: str
) -> None:
    """max-keys outside 1..1000, an unreadable token, an unknown encoding: 400."""
    query = {"prefix": "user/alice/", **params}
    url = list_url(listed, query)
    status, _, body = await raw("GET", URL(url, encoded=True))
    assert (status, error_xml(body)["Code"]) == (400, code)
