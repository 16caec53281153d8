"""Endpoints and addressing styles: where a bucket's URLs point, as the SDK builds them."""

from __future__ import annotations

import pytest

from broker.signing import OssEndpoint, bucket_url, presign
from tests.signing.sdk_oracle import ALIYUN, STS, T0, assert_matches_sdk, put_request, url_query


@pytest.mark.parametrize(
    ("endpoint", "prefix"),
    [
        (ALIYUN, "https://examplebucket.oss-cn-hangzhou.aliyuncs.com/dir/object.txt?"),
        (
            OssEndpoint("oss-cn-hangzhou.aliyuncs.com", addressing="path"),
            "https://oss-cn-hangzhou.aliyuncs.com/examplebucket/dir/object.txt?",
        ),
        (
            OssEndpoint("cdn.example.com", addressing="cname"),
            "https://cdn.example.com/dir/object.txt?",
        ),
        (
            OssEndpoint("127.0.0.1:9100", scheme="http", addressing="path"),
            "http://127.0.0.1:9100/examplebucket/dir/object.txt?",
        ),
        (
            OssEndpoint("127.0.0.1:9100", scheme="http"),
            "http://127.0.0.1:9100/examplebucket/dir/object.txt?",
        ),
        (
            OssEndpoint("localhost:9100", scheme="http"),
            "http://examplebucket.localhost:9100/dir/object.txt?",
        ),
    ],
    ids=["virtual", "path", "cname", "ip-path", "ip-forces-path", "localhost-virtual"],
)
def test_addressing_styles_match_sdk(endpoint: OssEndpoint, prefix: str) -> None:
    """Virtual-host, path-style, cname and IP endpoints build the SDK's URL."""
    url = assert_matches_sdk(STS, put_request(endpoint=endpoint))
    assert url.startswith(prefix)


def test_addressing_style_does_not_change_signature() -> None:
    """The canonical URI is /bucket/key whatever the addressing style."""
    signatures = {
        url_query(
            presign(STS, put_request(endpoint=OssEndpoint("h.example", addressing=style)), T0).url
        )["x-oss-signature"]
        for style in ("virtual", "path", "cname")
    }
    assert len(signatures) == 1


def test_endpoint_rejects_url_in_host() -> None:
    """OssEndpoint.host is host[:port], never a URL."""
    with pytest.raises(ValueError, match="host"):
        OssEndpoint("https://oss-cn-hangzhou.aliyuncs.com")


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        (ALIYUN, "https://examplebucket.oss-cn-hangzhou.aliyuncs.com"),
        (
            OssEndpoint("oss-cn-hangzhou.aliyuncs.com", addressing="path"),
            "https://oss-cn-hangzhou.aliyuncs.com/examplebucket",
        ),
        (OssEndpoint("cdn.example.com", addressing="cname"), "https://cdn.example.com"),
        (OssEndpoint("127.0.0.1:9100", scheme="http"), "http://127.0.0.1:9100/examplebucket"),
    ],
    ids=["virtual", "path", "cname", "ip-forces-path"],
)
def test_bucket_url_follows_the_addressing_style(endpoint: OssEndpoint, url: str) -> None:
    """bucket_url (where a PostObject form goes) is the object URL base without its slash."""
    assert bucket_url(endpoint, "examplebucket") == url
