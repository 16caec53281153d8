"""The official OSS SDK as an oracle for the V4 signer, and the fixtures the signing tests share."""

from __future__ import annotations

import functools
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import alibabacloud_oss_v2 as oss
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
    "put_request",
    "sdk_presign",
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
