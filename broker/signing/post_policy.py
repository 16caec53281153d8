"""PostObject form policies, signed with POST V4 (``OSS4-HMAC-SHA256``) or V1 (HMAC-SHA1)."""

from __future__ import annotations

import base64
import hmac
import json
from datetime import datetime, timedelta
from typing import Any

from broker.models import Credentials
from broker.signing.v4 import ALGORITHM, MAX_EXPIRES_SECONDS, as_utc, signing_key, x_oss_date

__all__ = ["post_policy_v1", "post_policy_v4"]


def post_policy_v4(
    credentials: Credentials,
    *,
    bucket: str,
    region: str,
    conditions: list[Any],
    expiration: datetime,
    signing_time: datetime,
) -> dict[str, str]:
    """PostObject form fields signed with POST V4 (``OSS4-HMAC-SHA256``).

    Per https://help.aliyun.com/en/oss/developer-reference/signature-version-4-recommend
    (zh: https://help.aliyun.com/zh/oss/developer-reference/signature-version-4-recommend):
    the policy's ``conditions`` must carry ``x-oss-signature-version``,
    ``x-oss-credential`` and ``x-oss-date`` with the same values as the form
    fields (and ``x-oss-security-token`` for STS credentials); the string to
    sign is the base64 of the policy JSON; ``x-oss-signature`` is
    hex(HMAC-SHA256(SigningKey, base64 policy)) with the V4 signing key for
    the x-oss-date's day, the region and ``oss``; a policy may be valid for at
    most 7 days after ``x-oss-date``.  ``conditions`` are the extra ones
    (``["starts-with", "$key", ...]``, ``["content-length-range", 0, n]``...).
    """
    when = as_utc(signing_time)
    until = as_utc(expiration)
    if not timedelta(0) < until - when <= timedelta(seconds=MAX_EXPIRES_SECONDS):
        raise ValueError("a POST policy must expire within 7 days after its signing time")
    stamp = x_oss_date(when)
    credential = f"{credentials.access_key_id}/{stamp[:8]}/{region}/oss/aliyun_v4_request"
    fields = {
        "x-oss-signature-version": ALGORITHM,
        "x-oss-credential": credential,
        "x-oss-date": stamp,
    }
    if credentials.security_token:
        fields["x-oss-security-token"] = credentials.security_token
    required: list[Any] = [{"bucket": bucket}, *({k: v} for k, v in fields.items())]
    policy = _encode_policy(until, required + list(conditions))
    sig_key = signing_key(credentials.access_key_secret, stamp[:8], region, "oss")
    return {
        "policy": policy,
        **fields,
        "x-oss-signature": hmac.digest(sig_key, policy.encode(), "sha256").hex(),
    }


def post_policy_v1(
    credentials: Credentials, *, conditions: list[Any], expiration: datetime
) -> dict[str, str]:
    """PostObject form fields signed with POST V1 (HMAC-SHA1).

    Per https://help.aliyun.com/en/oss/developer-reference/signature-version-1:
    ``Signature`` = base64(HMAC-SHA1(AccessKeySecret, base64 policy)); STS
    credentials add the ``x-oss-security-token`` form field.  Prefer V4.
    """
    policy = _encode_policy(as_utc(expiration), list(conditions))
    digest = hmac.digest(credentials.access_key_secret.encode(), policy.encode(), "sha1")
    fields = {
        "OSSAccessKeyId": credentials.access_key_id,
        "policy": policy,
        "Signature": base64.b64encode(digest).decode(),
    }
    if credentials.security_token:
        fields["x-oss-security-token"] = credentials.security_token
    return fields


def _encode_policy(expiration: datetime, conditions: list[Any]) -> str:
    iso = expiration.strftime("%Y-%m-%dT%H:%M:%S") + f".{expiration.microsecond // 1000:03d}Z"
    document = {"expiration": iso, "conditions": conditions}
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()
