"""The official OSS SDK as an oracle for the V4 signer, and the fixtures the signing tests share."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote, urlsplit

import alibabacloud_oss_v2 as oss
import pytest
from alibabacloud_oss_v2.credentials import StaticCredentialsProvider
from alibabacloud_oss_v2.signer import SignerV4

from broker.models import Credentials
from broker.signing import OssEndpoint, PresignInput, presign

__all__ = [
    "ALIYUN",
    "LONG_TERM",
    "STS",
    "T0",
    "assert_matches_sdk",
    "oss2_sign_url",
    "put_request",
    "sdk_presign",
    "sdk_signer_presign",
    "url_query",
]

T0 = datetime(2024, 5, 6, 7, 8, 9, tzinfo=UTC)
ALIYUN = OssEndpoint("oss-cn-hangzhou.aliyuncs.com")
STS = Credentials("STS.NTest", "secret/+=", "CAIS+token/with=chars", T0 + timedelta(hours=1))
LONG_TERM = Credentials("LTAI5tTest", "longtermsecret", "", T0 + timedelta(days=365))


class _FixedTimeSigner(SignerV4):  # type: ignore[misc]
    """The SDK's own V4 signer with the signing time preset."""

    signing_time: datetime | None = None

    def sign(self, signing_ctx: Any) -> None:
        signing_ctx.signing_time = self.signing_time
        super().sign(signing_ctx)


@functools.lru_cache(maxsize=128)
def _sdk_client(
    endpoint: OssEndpoint, region: str, ak: str, sk: str, token: str
) -> tuple[Any, _FixedTimeSigner]:
    cfg = oss.config.load_default()
    cfg.credentials_provider = StaticCredentialsProvider(ak, sk, token or None)
    cfg.region = region
    cfg.endpoint = f"{endpoint.scheme}://{endpoint.host}"
    cfg.use_path_style = endpoint.addressing == "path"
    cfg.use_cname = endpoint.addressing == "cname"
    signer = _FixedTimeSigner()
    return oss.Client(cfg, signer=signer), signer


def _sdk_request(req: PresignInput) -> Any:
    """The SDK request model for the operation ``req`` stands for, same headers and query."""
    common = {"bucket": req.bucket, "key": req.key, "headers": dict(req.headers)}
    params = {k: v or "" for k, v in req.query.items()}
    if params:
        common["parameters"] = params
    if req.method == "GET":
        return oss.GetObjectRequest(**common)
    if req.method == "HEAD":
        return oss.HeadObjectRequest(**common)
    if req.method == "PUT" and "partNumber" in params:
        return oss.UploadPartRequest(
            part_number=params["partNumber"], upload_id=params["uploadId"], **common
        )
    if req.method == "PUT":
        return oss.PutObjectRequest(**common)
    if req.method == "POST" and "uploads" in params:
        return oss.InitiateMultipartUploadRequest(**common)
    if req.method == "POST":
        return oss.CompleteMultipartUploadRequest(upload_id=params["uploadId"], **common)
    return oss.AbortMultipartUploadRequest(upload_id=params["uploadId"], **common)


def sdk_presign(creds: Credentials, req: PresignInput, when: datetime, model: Any = None) -> Any:
    """The SDK's presigned URL for ``req``, signed at ``when``."""
    client, signer = _sdk_client(
        req.endpoint, req.region, creds.access_key_id, creds.access_key_secret, creds.security_token
    )
    signer.signing_time = when
    expiration = when + timedelta(seconds=req.expires_seconds)
    return client.presign(model or _sdk_request(req), expiration=expiration)


def sdk_signer_presign(creds: Credentials, req: PresignInput, when: datetime) -> str:
    """The SDK's own ``SignerV4`` in query mode, with ``req.additional_headers``.

    For what the SDK's ``Client.presign`` cannot sign: it never passes
    ``Config.additional_headers`` to the signer (alibabacloud_oss_v2/_client.py
    ``build_request_context``), so a signed Content-Length needs the signer itself.
    Virtual-hosted endpoint, no sub-resources.
    """
    from alibabacloud_oss_v2.types import HttpRequest, SigningContext

    path = quote(req.key, safe="/")
    request = HttpRequest(
        req.method, f"{req.endpoint.scheme}://{req.bucket}.{req.endpoint.host}/{path}"
    )
    request.headers.update(req.headers)
    provider = StaticCredentialsProvider(
        creds.access_key_id, creds.access_key_secret, creds.security_token or None
    )
    context = SigningContext(
        product=req.product,
        region=req.region,
        bucket=req.bucket,
        key=req.key,
        request=request,
        credentials=provider.get_credentials(),
        signing_time=when,
        additional_headers=set(req.additional_headers),
    )
    context.expiration_time = when + timedelta(seconds=req.expires_seconds)
    context.auth_method_query = True
    SignerV4().sign(context)
    signed: str = request.url
    return signed


class _Oss2Clock(datetime):
    """What ``oss2.auth`` calls ``datetime``: ``utcnow()`` is the signing time set here."""

    signing_time = T0

    @classmethod
    def utcnow(cls) -> datetime:  # type: ignore[override]
        return cls.signing_time.astimezone(UTC).replace(tzinfo=None)


def oss2_sign_url(
    creds: Credentials, req: PresignInput, when: datetime, monkeypatch: pytest.MonkeyPatch
) -> str:
    """oss2's V4 ``Bucket.sign_url`` for ``req`` at ``when`` (virtual-hosted endpoint).

    oss2 orders the query differently and encodes ``/`` in the path, so compare
    what it signs (parsed query, decoded path), not the text.
    """
    import oss2
    import oss2.auth
    from oss2.credentials import StaticCredentialsProvider as Oss2Provider

    _Oss2Clock.signing_time = when
    monkeypatch.setattr(oss2.auth, "datetime", _Oss2Clock)
    provider = Oss2Provider(creds.access_key_id, creds.access_key_secret, creds.security_token)
    endpoint = f"{req.endpoint.scheme}://{req.endpoint.host}"
    bucket = oss2.Bucket(oss2.ProviderAuthV4(provider), endpoint, req.bucket, region=req.region)
    params = {name: value or "" for name, value in req.query.items()}
    url: str = bucket.sign_url(
        req.method,
        req.key,
        req.expires_seconds,
        headers=dict(req.headers),
        params=params or None,
        additional_headers=list(req.additional_headers) or None,
    )
    return url


def assert_matches_sdk(
    creds: Credentials, req: PresignInput, when: datetime = T0, model: Any = None
) -> str:
    ours = presign(creds, req, when)
    sdk = sdk_presign(creds, req, when, model)
    context = f"\n{creds!r}\n{req!r}\n{when.isoformat()}"
    assert ours.url == sdk.url, context
    assert ours.method == sdk.method, context
    assert ours.signed_headers == dict(sdk.signed_headers), context
    assert ours.expiration == sdk.expiration.replace(microsecond=0), context
    return ours.url


def url_query(url: str) -> dict[str, str]:
    """The raw (still percent-encoded) query pairs of ``url``."""
    return dict(pair.partition("=")[::2] for pair in urlsplit(url).query.split("&"))


def put_request(key: str = "dir/object.txt", **changes: Any) -> PresignInput:
    fields: dict[str, Any] = {
        "method": "PUT",
        "bucket": "examplebucket",
        "key": key,
        "region": "cn-hangzhou",
        "endpoint": ALIYUN,
        "expires_seconds": 600,
    }
    fields.update(changes)
    return PresignInput(**fields)
