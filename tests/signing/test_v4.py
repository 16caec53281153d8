"""OSS V4 presigning and header signing: published SDK vectors, the official SDK as an oracle."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import random
import string
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

import alibabacloud_oss_v2 as oss
import pytest
from alibabacloud_oss_v2.credentials import StaticCredentialsProvider
from alibabacloud_oss_v2.signer import SignerV4

from broker.models import Credentials
from broker.signing import (
    OssEndpoint,
    PresignInput,
    authorization_v4,
    key_states,
    presign,
    signing_key,
    v4,
)
from tests.signing.sdk_oracle import (
    ALIYUN,
    LONG_TERM,
    STS,
    T0,
    assert_matches_sdk,
    oss2_sign_url,
    put_request,
    url_query,
)

# --- published vectors: aliyun/alibabacloud-oss-python-sdk-v2 tests/unit/signer/test_v4.py ---

VECTOR_HEADERS = {
    "x-oss-head1": "value",
    "abc": "value",
    "ZAbc": "value",
    "XYZ": "value",
    "content-type": "application/octet-stream",
}
VECTOR_QUERY = {
    "param1": "value1",
    "+param1": "value3",
    "|param1": "value4",
    "+param2": "",
    "|param2": "",
    "param2": "",
}
AK_SK = Credentials("ak", "sk", "", T0)
AK_SK_TOKEN = Credentials("ak", "sk", "token", T0)


def _vector_presign(
    creds: Credentials,
    timestamp: int,
    expires: int,
    additional: frozenset[str] = frozenset(),
    product: str = "oss",
    region: str = "cn-hangzhou",
) -> dict[str, str]:
    req = PresignInput(
        method="PUT",
        bucket="bucket",
        key="1234+-/123/1.txt",
        region=region,
        endpoint=OssEndpoint("oss-cn-hangzhou.aliyuncs.com", scheme="http"),
        expires_seconds=expires,
        headers=VECTOR_HEADERS,
        query=VECTOR_QUERY,
        product=product,
        additional_headers=additional,
    )
    return url_query(presign(creds, req, datetime.fromtimestamp(timestamp, UTC)).url)


def test_vector_authurl_query() -> None:
    """SDK vector test_auth_query: query signature without token."""
    q = _vector_presign(AK_SK, 1702781677, 599)
    assert q["x-oss-signature-version"] == "OSS4-HMAC-SHA256"
    assert q["x-oss-expires"] == "599"
    assert q["x-oss-credential"] == "ak%2F20231217%2Fcn-hangzhou%2Foss%2Faliyun_v4_request"
    assert (
        q["x-oss-signature"] == "a39966c61718be0d5b14e668088b3fa07601033f6518ac7b523100014269c0fe"
    )
    assert "x-oss-additional-headers" not in q
    assert "x-oss-security-token" not in q


def test_vector_auth_query_with_token() -> None:
    """SDK vector test_auth_query_with_token: the token is a signed query parameter."""
    q = _vector_presign(AK_SK_TOKEN, 1702785388, 599)
    assert q["x-oss-date"] == "20231217T035628Z"
    assert q["x-oss-security-token"] == "token"
    assert (
        q["x-oss-signature"] == "3817ac9d206cd6dfc90f1c09c00be45005602e55898f26f5ddb06d7892e1f8b5"
    )


def test_vector_auth_query_with_empty_token() -> None:
    """SDK vector test_auth_query_with_empty_token: an empty token adds no parameter."""
    assert "x-oss-security-token" not in _vector_presign(AK_SK, 1702785388, 599)


@pytest.mark.parametrize(
    "additional",
    [frozenset({"ZAbc", "abc"}), frozenset({"x-oss-no-exist", "ZAbc", "x-oss-head1", "abc"})],
)
def test_vector_auth_query_with_additional_headers(additional: frozenset[str]) -> None:
    """SDK vector test_auth_query_with_additional_headers: absent/default names are dropped."""
    q = _vector_presign(AK_SK, 1702783809, 599, additional)
    assert q["x-oss-date"] == "20231217T033009Z"
    assert q["x-oss-additional-headers"] == "abc%3Bzabc"
    assert (
        q["x-oss-signature"] == "6bd984bfe531afb6db1f7550983a741b103a8c58e5e14f83ea474c2322dfa2b7"
    )


def test_vector_auth_query_long_expiration() -> None:
    """SDK vector test_auth_query_long_expiration: five days of validity."""
    q = _vector_presign(AK_SK, 1702781677, 5 * 24 * 3600)
    assert q["x-oss-expires"] == "432000"
    assert (
        q["x-oss-signature"] == "31029123dc7732d2d2cfd4006ea4fdb6cf86da6478f813e2bf8f87877c7b9fec"
    )


@pytest.mark.parametrize(
    ("timestamp", "additional", "signature"),
    [
        (
            1702781677,
            frozenset({"ZAbc", "abc"}),
            "07284191b9b4978ac3520cd39ee2dea2747eda454089359371ff463a6c7ba20f",
        ),
        (
            1702783809,
            frozenset({"x-oss-no-exist", "ZAbc", "x-oss-head1", "abc"}),
            "16782cc8a7a554523db055eb804b508522e7e370073108ad88ee2f47496701dd",
        ),
    ],
)
def test_vector_auth_query_cloud_box(
    timestamp: int, additional: frozenset[str], signature: str
) -> None:
    """SDK vector test_auth_query_with_cloud_box: product and region enter the scope."""
    q = _vector_presign(AK_SK, timestamp, 599, additional, "oss-cloudbox", "cb-123")
    assert q["x-oss-credential"] == "ak%2F20231217%2Fcb-123%2Foss-cloudbox%2Faliyun_v4_request"
    assert q["x-oss-signature"] == signature


def _vector_authorization(
    creds: Credentials,
    timestamp: int,
    additional: frozenset[str] = frozenset(),
    product: str = "oss",
    region: str = "cn-hangzhou",
) -> dict[str, str]:
    headers = {**VECTOR_HEADERS, "content-type": "text/plain"}
    headers["x-oss-content-sha256"] = "UNSIGNED-PAYLOAD"
    return authorization_v4(
        creds,
        method="PUT",
        bucket="bucket",
        key="1234+-/123/1.txt",
        region=region,
        signing_time=datetime.fromtimestamp(timestamp, UTC),
        headers=headers,
        query=VECTOR_QUERY,
        product=product,
        additional_headers=additional,
    )


def test_vector_auth_header() -> None:
    """SDK vector test_auth_header: Authorization header without token."""
    assert _vector_authorization(AK_SK, 1702743657)["Authorization"] == (
        "OSS4-HMAC-SHA256 Credential=ak/20231216/cn-hangzhou/oss/aliyun_v4_request,"
        "Signature=e21d18daa82167720f9b1047ae7e7f1ce7cb77a31e8203a7d5f4624fa0284afe"
    )


def test_vector_auth_header_with_token() -> None:
    """SDK vector test_auth_header_with_token: the token header is signed."""
    added = _vector_authorization(AK_SK_TOKEN, 1702784856)
    assert added["x-oss-security-token"] == "token"
    assert added["Authorization"] == (
        "OSS4-HMAC-SHA256 Credential=ak/20231217/cn-hangzhou/oss/aliyun_v4_request,"
        "Signature=b94a3f999cf85bcdc00d332fbd3734ba03e48382c36fa4d5af5df817395bd9ea"
    )


def test_vector_auth_header_with_empty_token() -> None:
    """SDK vector test_auth_header_with_empty_token: no token header for an empty token."""
    assert "x-oss-security-token" not in _vector_authorization(AK_SK, 1702784856)


@pytest.mark.parametrize(
    "additional",
    [frozenset({"ZAbc", "abc"}), frozenset({"x-oss-no-exist", "ZAbc", "x-oss-head1", "abc"})],
)
def test_vector_auth_header_with_additional_headers(additional: frozenset[str]) -> None:
    """SDK vector test_auth_header_with_additional_headers: AdditionalHeaders=abc;zabc."""
    assert _vector_authorization(AK_SK, 1702747512, additional)["Authorization"] == (
        "OSS4-HMAC-SHA256 Credential=ak/20231216/cn-hangzhou/oss/aliyun_v4_request,"
        "AdditionalHeaders=abc;zabc,"
        "Signature=4a4183c187c07c8947db7620deb0a6b38d9fbdd34187b6dbaccb316fa251212f"
    )


def test_vector_auth_header_cloud_box() -> None:
    """SDK vector test_auth_header_cloud_box: oss-cloudbox product and cb-123 region."""
    added = _vector_authorization(AK_SK, 1702743657, product="oss-cloudbox", region="cb-123")
    assert added["Authorization"] == (
        "OSS4-HMAC-SHA256 Credential=ak/20231216/cb-123/oss-cloudbox/aliyun_v4_request,"
        "Signature=94ce1f12c17d148ea681030275a94449d3357f5b5b21133996eec80af3e08a43"
    )


def test_authorization_matches_sdk_header_signer() -> None:
    """Header signing adds the same headers, in the same values, as the SDK's SignerV4."""
    from alibabacloud_oss_v2.types import HttpRequest, SigningContext

    provider = StaticCredentialsProvider(
        STS.access_key_id, STS.access_key_secret, STS.security_token
    )
    request = HttpRequest("PUT", "https://examplebucket.oss-cn-hangzhou.aliyuncs.com/a%20b?uploads")
    request.headers.update({"Content-Type": "image/png", "x-oss-meta-Who": "ü"})
    SignerV4().sign(
        SigningContext(
            product="oss",
            region="cn-hangzhou",
            bucket="examplebucket",
            key="a b",
            request=request,
            credentials=provider.get_credentials(),
            signing_time=T0,
        )
    )
    added = authorization_v4(
        STS,
        method="PUT",
        bucket="examplebucket",
        key="a b",
        region="cn-hangzhou",
        signing_time=T0,
        headers={"Content-Type": "image/png", "x-oss-meta-Who": "ü"},
        query={"uploads": None},
    )
    assert added == {name: request.headers[name] for name in added}


def test_query_additional_headers_match_sdk_query_signer() -> None:
    """Additional headers without sub-resources sign as the SDK's SignerV4 in query mode."""
    from alibabacloud_oss_v2.types import HttpRequest, SigningContext

    headers = {"Content-Type": "text/plain", "X-Extra": "1", "Range": ""}
    request = HttpRequest("PUT", "https://examplebucket.oss-cn-hangzhou.aliyuncs.com/a%20b")
    request.headers.update(headers)
    provider = StaticCredentialsProvider(
        STS.access_key_id, STS.access_key_secret, STS.security_token
    )
    context = SigningContext(
        product="oss",
        region="cn-hangzhou",
        bucket="examplebucket",
        key="a b",
        request=request,
        credentials=provider.get_credentials(),
        signing_time=T0,
        additional_headers={"x-extra", "Range", "content-type"},
    )
    context.expiration_time = T0 + timedelta(seconds=600)
    context.auth_method_query = True
    SignerV4().sign(context)
    ours = presign(
        STS,
        put_request(
            "a b", headers=headers, additional_headers={"x-extra", "Range", "content-type"}
        ),
        T0,
    )
    assert ours.url == request.url
    assert url_query(ours.url)["x-oss-additional-headers"] == "x-extra"
    assert ours.signed_headers == {"Content-Type": "text/plain", "X-Extra": "1"}


# --- keys -----------------------------------------------------------------

KEYS = {
    "plain": ("a/b/c.txt", "/a/b/c.txt"),
    "space-plus": ("my file+1.txt", "/my%20file%2B1.txt"),
    "reserved": ("r&=?#%~!*'().bin", "/r%26%3D%3F%23%25~%21%2A%27%28%29.bin"),
    "unicode": ("照片/été 😀.png", "/%E7%85%A7%E7%89%87/%C3%A9t%C3%A9%20%F0%9F%98%80.png"),
    "slashes": ("/lead//double/trail/", "//lead//double/trail/"),
    "controls": ("tab\there\nnl", "/tab%09here%0Anl"),
    "semicolon-comma": ("a;b,c:d@e$f", "/a%3Bb%2Cc%3Ad%40e%24f"),
}


@pytest.mark.parametrize(("key", "path"), KEYS.values(), ids=KEYS.keys())
def test_key_encoding_matches_sdk(key: str, path: str) -> None:
    """Keys keep / and unreserved characters; everything else is UTF-8 percent-encoded."""
    url = assert_matches_sdk(STS, put_request(key))
    assert url.startswith(f"https://examplebucket.oss-cn-hangzhou.aliyuncs.com{path}?")


def test_key_of_1024_characters_matches_sdk() -> None:
    """The longest key the SDK accepts signs identically."""
    assert_matches_sdk(LONG_TERM, put_request("k/" + "é" * 1022))


# --- signed headers --------------------------------------------------------


def test_put_object_signed_headers_match_sdk() -> None:
    """Content-Type, Content-MD5, metadata, storage class, forbid-overwrite, callback are signed."""
    model = oss.PutObjectRequest(
        bucket="examplebucket",
        key="avatars/alice/me.png",
        content_type="image/png",
        content_md5="eB5eJF1ptWaXm4bijSPyxw==",
        metadata={"Owner": "alice", "note": "héllo wörld"},
        storage_class="IA",
        forbid_overwrite=True,
        callback="eyJjYWxsYmFja1VybCI6Imh0dHA6Ly9leGFtcGxlLmNvbSJ9",
        cache_control="no-cache",
    )
    headers = {
        "Content-Type": "image/png",
        "Content-MD5": "eB5eJF1ptWaXm4bijSPyxw==",
        "x-oss-meta-Owner": "alice",
        "x-oss-meta-note": "héllo wörld",
        "x-oss-storage-class": "IA",
        "x-oss-forbid-overwrite": "true",
        "x-oss-callback": "eyJjYWxsYmFja1VybCI6Imh0dHA6Ly9leGFtcGxlLmNvbSJ9",
        "Cache-Control": "no-cache",
    }
    req = put_request("avatars/alice/me.png", headers=headers)
    assert_matches_sdk(STS, req, model=model)
    signed = presign(STS, req, T0).signed_headers
    assert "Cache-Control" not in signed
    assert signed["x-oss-meta-Owner"] == "alice"


# --- what oss2 (the other official Python client) signs ----------------------

_OSS2_CASES = {
    "delete": put_request("dir/a b.txt", method="DELETE"),
    "head": put_request("dir/a b.txt", method="HEAD"),
    "get-response-overrides": put_request(
        "dir/a b.txt",
        method="GET",
        query={
            "response-content-disposition": 'attachment; filename="a b.txt"',
            "response-content-type": "text/csv; charset=utf-8",
            "response-cache-control": "private, max-age=600",
        },
    ),
    "put-signed-content-length": put_request(
        "dir/a b.txt",
        headers={
            "Content-Type": "text/csv",
            "Content-Length": "5",
            "x-oss-forbid-overwrite": "true",
        },
        additional_headers=("content-length",),
    ),
}


@pytest.mark.parametrize("req", _OSS2_CASES.values(), ids=_OSS2_CASES.keys())
def test_signature_matches_oss2_sign_url(
    req: PresignInput, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DELETE, HEAD, a GET's response-* and a signed Content-Length sign as oss2's V4 sign_url."""
    ours = urlsplit(presign(STS, req, T0).url)
    theirs = urlsplit(oss2_sign_url(STS, req, T0, monkeypatch))
    assert dict(parse_qsl(ours.query)) == dict(parse_qsl(theirs.query))
    assert unquote(ours.path) == unquote(theirs.path)


def test_signed_content_length_is_an_additional_header() -> None:
    """Content-Length is signed only when named, and then returned to send unchanged."""
    headers = {"Content-Type": "text/csv", "Content-Length": "5"}
    plain = presign(STS, put_request(headers=headers), T0)
    bound = presign(STS, put_request(headers=headers, additional_headers=("content-length",)), T0)
    assert "x-oss-additional-headers" not in url_query(plain.url)
    assert plain.signed_headers == {"Content-Type": "text/csv"}
    assert url_query(bound.url)["x-oss-additional-headers"] == "content-length"
    assert bound.signed_headers == headers


def test_unsigned_headers_do_not_change_url() -> None:
    """Headers outside Content-Type/Content-MD5/x-oss-* are neither signed nor returned."""
    plain = presign(STS, put_request(headers={"Content-Type": "text/plain"}), T0)
    extra = presign(
        STS, put_request(headers={"Content-Type": "text/plain", "Cache-Control": "no-store"}), T0
    )
    assert plain == extra


def test_signed_header_value_changes_signature() -> None:
    """A different Content-Type yields a different signature."""
    png = presign(STS, put_request(headers={"Content-Type": "image/png"}), T0).url
    jpeg = presign(STS, put_request(headers={"Content-Type": "image/jpeg"}), T0).url
    assert png != jpeg


def test_empty_metadata_value_is_signed_like_sdk() -> None:
    """An x-oss-meta-* header with an empty value is still signed, as by the SDK."""
    assert_matches_sdk(STS, put_request(headers={"x-oss-meta-empty": "", "X-OSS-Meta-Case": "v"}))


def test_header_given_twice_is_refused() -> None:
    """Two spellings of one header name are ambiguous and refused."""
    with pytest.raises(ValueError, match="twice"):
        presign(STS, put_request(headers={"Content-Type": "a/b", "content-type": "c/d"}), T0)


# --- sub-resources and operations -------------------------------------------

UPLOAD_ID = "0004B9894A22E5B1888A1E29F823****"


@pytest.mark.parametrize(
    ("req", "model"),
    [
        (
            put_request(method="POST", query={"uploads": None}),
            oss.InitiateMultipartUploadRequest(bucket="examplebucket", key="dir/object.txt"),
        ),
        (
            put_request(query={"partNumber": "7", "uploadId": UPLOAD_ID}),
            oss.UploadPartRequest(
                bucket="examplebucket", key="dir/object.txt", part_number=7, upload_id=UPLOAD_ID
            ),
        ),
        (
            put_request(method="POST", query={"uploadId": UPLOAD_ID}),
            oss.CompleteMultipartUploadRequest(
                bucket="examplebucket", key="dir/object.txt", upload_id=UPLOAD_ID
            ),
        ),
        (
            put_request(method="DELETE", query={"uploadId": UPLOAD_ID}),
            oss.AbortMultipartUploadRequest(
                bucket="examplebucket", key="dir/object.txt", upload_id=UPLOAD_ID
            ),
        ),
        (
            put_request(method="GET"),
            oss.GetObjectRequest(bucket="examplebucket", key="dir/object.txt"),
        ),
        (
            put_request(
                method="GET",
                query={"response-content-disposition": 'attachment; filename="a b.txt"'},
            ),
            oss.GetObjectRequest(
                bucket="examplebucket",
                key="dir/object.txt",
                response_content_disposition='attachment; filename="a b.txt"',
            ),
        ),
    ],
    ids=["initiate", "upload-part", "complete", "abort", "get", "get-response-disposition"],
)
@pytest.mark.parametrize("creds", [STS, LONG_TERM], ids=["sts", "long-term"])
def test_operations_match_sdk(req: PresignInput, model: Any, creds: Credentials) -> None:
    """Each presignable operation, with and without a token, matches the SDK's own model."""
    assert_matches_sdk(creds, req, model=model)


def test_security_token_is_encoded_query_parameter() -> None:
    """An STS token travels percent-encoded as x-oss-security-token."""
    q = url_query(presign(STS, put_request(), T0).url)
    assert q["x-oss-security-token"] == "CAIS%2Btoken%2Fwith%3Dchars"
    assert "x-oss-security-token" not in url_query(presign(LONG_TERM, put_request(), T0).url)


def test_signature_parameters_cannot_be_passed_in() -> None:
    """A caller cannot smuggle x-oss-signature or friends into the query."""
    with pytest.raises(ValueError, match="written by the signer"):
        presign(STS, put_request(query={"x-oss-expires": "1"}), T0)


# --- time and limits -----------------------------------------------------------


def test_non_utc_signing_time_is_converted() -> None:
    """An aware non-UTC signing time signs as the same instant in UTC."""
    shanghai = T0.astimezone(timezone(timedelta(hours=8)))
    assert presign(STS, put_request(), shanghai) == presign(STS, put_request(), T0)


def test_naive_signing_time_is_refused() -> None:
    """A naive datetime is ambiguous and refused."""
    with pytest.raises(ValueError, match="timezone-aware"):
        presign(STS, put_request(), T0.replace(tzinfo=None))


def test_expiration_is_truncated_signing_time_plus_expires() -> None:
    """Expiration is x-oss-date (whole seconds) plus x-oss-expires, and matches the SDK."""
    when = T0.replace(microsecond=987654)
    result = presign(STS, put_request(expires_seconds=900), when)
    assert result.expiration == T0 + timedelta(seconds=900)
    assert_matches_sdk(STS, put_request(expires_seconds=900), when)


@pytest.mark.parametrize("expires", [0, -1, 7 * 24 * 3600 + 1])
def test_expires_out_of_range_is_refused(expires: int) -> None:
    """x-oss-expires must lie within 1 s and 7 days."""
    with pytest.raises(ValueError, match="expires_seconds"):
        presign(STS, put_request(expires_seconds=expires), T0)


def test_seven_days_is_accepted_and_matches_sdk() -> None:
    """The 7-day maximum itself is allowed."""
    assert_matches_sdk(STS, put_request(expires_seconds=7 * 24 * 3600))


@pytest.mark.parametrize("bucket", ["ab", "Upper", "-lead", "trail-", "dot.ted", "x" * 64])
def test_invalid_bucket_is_refused(bucket: str) -> None:
    """Bucket names follow OSS's rule: 3-63 of a-z, 0-9 and inner '-'."""
    with pytest.raises(ValueError, match="bucket"):
        presign(STS, put_request(bucket=bucket), T0)


@pytest.mark.parametrize("key", ["", "k" * 1025])
def test_invalid_key_length_is_refused(key: str) -> None:
    """Keys must have 1 to 1024 characters."""
    with pytest.raises(ValueError, match="key"):
        presign(STS, put_request(key), T0)


def test_signing_key_is_the_documented_hmac_chain() -> None:
    """signing_key is the HMAC chain over "aliyun_v4"+secret, date, region, product."""
    expected = ("aliyun_v4" + "sk").encode()
    for part in ("20231217", "cn-hangzhou", "oss", "aliyun_v4_request"):
        expected = hmac.new(expected, part.encode(), hashlib.sha256).digest()
    assert signing_key("sk", "20231217", "cn-hangzhou") == expected
    assert not hasattr(signing_key, "cache_info")  # no memo keyed by secrets


# --- the token-bound signing state memo ---


def _token(key_id: str, secret: str, expiration: datetime = T0 + timedelta(hours=1)) -> Credentials:
    return Credentials(key_id, secret, "tok-" + secret, expiration)


def test_key_state_is_kept_for_the_same_credentials_object_only() -> None:
    """The state is reused for the same credentials; a replaced token under the same id is not."""
    first = _token("STS.same-id", "secret-one")
    state = v4.key_state(first, "20240101", "cn-hangzhou", "oss", T0)
    assert v4.key_state(first, "20240101", "cn-hangzhou", "oss", T0) is state
    replaced = _token("STS.same-id", "secret-two")
    other = v4.key_state(replaced, "20240101", "cn-hangzhou", "oss", T0)
    assert other.credentials is replaced
    assert other.token == "tok-secret-two"
    request = put_request()
    assert presign(replaced, request, T0).url != presign(first, request, T0).url
    assert (
        presign(replaced, request, T0).url
        == presign(_token("STS.same-id", "secret-two"), request, T0).url
    )


def test_key_state_is_dropped_once_its_token_expires() -> None:
    """At the first signature past a token's expiration its state (and secret) leaves the memo."""
    creds = _token("STS.expiring", "secret-e", T0 + timedelta(seconds=10))
    v4.key_state(creds, "20240101", "cn-hangzhou", "oss", T0)
    assert any(s.credentials is creds for s in key_states._KEY_STATES.values())
    later = T0 + timedelta(seconds=10)
    v4.key_state(_token("STS.other", "secret-o"), "20240101", "cn-hangzhou", "oss", later)
    assert not any(s.credentials is creds for s in key_states._KEY_STATES.values())


def test_expired_credentials_are_never_kept() -> None:
    """Credentials expired at the signing time still sign (the caller decides); never kept."""
    creds = _token("STS.expired", "secret-x", T0)
    v4.key_state(creds, "20240101", "cn-hangzhou", "oss", T0)
    assert not any(s.credentials is creds for s in key_states._KEY_STATES.values())


def test_key_state_memo_is_bounded() -> None:
    """However many tokens sign, the memo holds at most MAX_KEY_STATES of them."""
    for n in range(v4.MAX_KEY_STATES + 50):
        v4.key_state(_token(f"STS.n{n}", f"s{n}"), "20240101", "cn-hangzhou", "oss", T0)
    assert len(key_states._KEY_STATES) <= v4.MAX_KEY_STATES


def test_empty_additional_header_is_not_signed_then_signed_with_a_value() -> None:
    """The header plan memo tells an empty additional header from one with a value."""
    req = put_request(headers={"Content-Length": "", "Content-Type": "text/plain"})
    empty = presign(STS, _with(req, additional_headers=("content-length",)), T0)
    assert "x-oss-additional-headers" not in empty.url
    assert empty.signed_headers == {"Content-Type": "text/plain"}
    req = put_request(headers={"Content-Length": "5", "Content-Type": "text/plain"})
    filled = presign(STS, _with(req, additional_headers=("content-length",)), T0)
    assert "x-oss-additional-headers=content-length" in filled.url
    assert filled.signed_headers == {"Content-Length": "5", "Content-Type": "text/plain"}


def test_expires_seconds_argument_overrides_the_request() -> None:
    """presign(expires_seconds=n) signs exactly what a request with that lifetime signs."""
    req = put_request(expires_seconds=60)
    assert presign(STS, req, T0, expires_seconds=900) == presign(
        STS, _with(req, expires_seconds=900), T0
    )


def _with(request: PresignInput, **changes: Any) -> PresignInput:
    return dataclasses.replace(request, **changes)


# --- random differential testing against the SDK ----------------------------

_KEY_ALPHABET = (
    string.ascii_letters
    + string.digits
    + " /+&=?#%~!*'()-_.;,:@$[]{}^`|\"<>\\\t"
    + ("éü中文照片😀\u00a0\u200b")
)
_MIME = ["image/png", "image/jpeg", "text/plain; charset=utf-8", "application/octet-stream"]
_REGIONS = ["cn-hangzhou", "cn-beijing", "us-west-1", "ap-southeast-1", "eu-central-1"]
_ENDPOINTS = [
    ALIYUN,
    OssEndpoint("oss-us-west-1.aliyuncs.com", addressing="path"),
    OssEndpoint("cdn.example.com", addressing="cname"),
    OssEndpoint("127.0.0.1:9100", scheme="http", addressing="path"),
    OssEndpoint("10.0.0.7", scheme="http"),
    OssEndpoint("oss.internal.example:8443"),
]


def _text(rng: random.Random, alphabet: str, low: int, high: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(low, high)))


def _random_credentials(rng: random.Random) -> Credentials:
    token = ""
    if rng.random() < 0.7:
        token = _text(rng, string.ascii_letters + string.digits + "+/=", 100, 700)
    return Credentials(
        access_key_id=("STS." if token else "LTAI") + _text(rng, string.ascii_letters, 8, 24),
        access_key_secret=_text(rng, string.ascii_letters + string.digits + "+/=", 20, 40),
        security_token=token,
        expiration=T0,
    )


def _random_headers(rng: random.Random) -> dict[str, str]:
    headers: dict[str, str] = {}
    if rng.random() < 0.6:
        headers[rng.choice(["Content-Type", "content-type"])] = rng.choice(_MIME)
    if rng.random() < 0.3:
        headers["Content-MD5"] = base64.b64encode(rng.randbytes(16)).decode()
    for _ in range(rng.randint(0, 3)):
        name = _text(rng, string.ascii_letters + string.digits + "-", 1, 12)
        headers[f"x-oss-meta-{name}"] = _text(rng, string.printable.strip() + " éü中", 0, 30)
    if rng.random() < 0.3:
        headers["x-oss-storage-class"] = rng.choice(["Standard", "IA", "Archive"])
    if rng.random() < 0.3:
        headers["x-oss-forbid-overwrite"] = rng.choice(["true", "false"])
    if rng.random() < 0.2:
        headers["Cache-Control"] = "max-age=60"
    return _dedupe(headers)


def _dedupe(headers: Mapping[str, str]) -> dict[str, str]:
    seen: dict[str, tuple[str, str]] = {}
    for name, value in headers.items():
        seen.setdefault(name.lower(), (name, value))
    return dict(seen.values())


def _random_operation(rng: random.Random) -> tuple[str, dict[str, str | None]]:
    upload_id = _text(rng, string.ascii_uppercase + string.digits, 16, 32)
    choice = rng.randrange(7)
    if choice == 0:
        return "POST", {"uploads": rng.choice([None, ""])}
    if choice == 1:
        return "PUT", {"partNumber": str(rng.randint(1, 10000)), "uploadId": upload_id}
    if choice == 2:
        return "POST", {"uploadId": upload_id}
    if choice == 3:
        return "DELETE", {"uploadId": upload_id}
    if choice == 4:
        value = _text(rng, _KEY_ALPHABET, 1, 20)
        return "GET", {"response-content-disposition": value, "x-oss-process": "image/resize"}
    return rng.choice(["GET", "PUT", "HEAD"]), {}


def _random_case(rng: random.Random) -> tuple[Credentials, PresignInput, datetime]:
    method, query = _random_operation(rng)
    bucket = (
        rng.choice(string.ascii_lowercase)
        + _text(rng, string.ascii_lowercase + string.digits + "-", 1, 40)
        + rng.choice(string.digits)
    )
    req = PresignInput(
        method=method,
        bucket=bucket,
        key=_text(rng, _KEY_ALPHABET, 1, 80),
        region=rng.choice(_REGIONS),
        endpoint=rng.choice(_ENDPOINTS),
        expires_seconds=rng.randint(1, 7 * 24 * 3600),
        headers=_random_headers(rng),
        query=query,
    )
    when = datetime.fromtimestamp(rng.randint(1_577_836_800, 1_700_000_000), UTC)
    if rng.random() < 0.2:
        when = when.replace(microsecond=rng.randrange(1_000_000))
    return _random_credentials(rng), req, when


def _differential(seed: int, cases: int) -> None:
    rng = random.Random(seed)
    for _ in range(cases):
        creds, req, when = _random_case(rng)
        assert_matches_sdk(creds, req, when)


def test_random_inputs_match_sdk() -> None:
    """300 seeded random presigns are byte-identical to the SDK's."""
    _differential(seed=20240506, cases=300)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_random_inputs_match_sdk_10k() -> None:
    """10,000 seeded random presigns are byte-identical to the SDK's."""
    _differential(seed=7, cases=10_000)


def test_url_query_is_parseable() -> None:
    """The presigned URL's query parses into the documented V4 parameters."""
    names = [name for name, _ in parse_qsl(urlsplit(presign(STS, put_request(), T0).url).query)]
    assert names == [
        "x-oss-signature-version",
        "x-oss-date",
        "x-oss-expires",
        "x-oss-credential",
        "x-oss-security-token",
        "x-oss-signature",
    ]


# --- a kept plan signs as presign does ---------------------------------------


def test_a_kept_plan_signs_every_key_token_and_time_as_presign() -> None:
    """One presign_plan signed with 300 random keys, tokens, times, lifetimes equals presign."""
    rng = random.Random(18)
    for _ in range(30):
        _, req, _ = _random_case(rng)
        plan = v4.presign_plan(req)
        for _ in range(10):
            creds, other, when = _random_case(rng)
            key, expires = other.key, other.expires_seconds
            fresh = presign(creds, _with(req, key=key), when, expires_seconds=expires)
            assert v4.presign_planned(plan, creds, key, when, expires) == fresh


def test_a_plan_holds_no_key_token_or_time() -> None:
    """A plan's fields are the same whatever key and lifetime the request it came from had."""
    one = v4.presign_plan(put_request("a/one.txt", expires_seconds=60))
    other = v4.presign_plan(put_request("b/other.txt", expires_seconds=900))
    assert one == other
    values = [getattr(one, field.name) for field in dataclasses.fields(one)]
    assert not any("one.txt" in str(value) for value in values)


def test_a_plan_refuses_what_presign_refuses() -> None:
    """A bad method or bucket is refused when planning; a bad key or lifetime when signing."""
    with pytest.raises(ValueError, match="unsupported method"):
        v4.presign_plan(_with(put_request(), method="PATCH"))
    with pytest.raises(ValueError, match="invalid bucket"):
        v4.presign_plan(put_request(bucket="Bad_Bucket"))
    plan = v4.presign_plan(put_request())
    with pytest.raises(ValueError, match="object key"):
        v4.presign_planned(plan, STS, "", T0, 60)
    with pytest.raises(ValueError, match="expires_seconds"):
        v4.presign_planned(plan, STS, "k", T0, 0)


def test_the_signed_headers_handed_out_are_a_copy_of_the_plans() -> None:
    """Changing the signed headers of one URL changes no other URL signed with the same plan."""
    plan = v4.presign_plan(put_request(headers={"Content-Type": "text/plain"}))
    first = v4.presign_planned(plan, STS, "k1", T0, 60)
    first.signed_headers["Content-Type"] = "text/html"
    assert v4.presign_planned(plan, STS, "k2", T0, 60).signed_headers == {
        "Content-Type": "text/plain"
    }
