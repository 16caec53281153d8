"""PostObject form policies, signed with POST V4 (``OSS4-HMAC-SHA256``) or V1 (HMAC-SHA1)."""

from __future__ import annotations

import base64
import hmac
import json
from datetime import datetime, timedelta
from typing import Any

import orjson

from broker.models import Credentials
from broker.signing.v4 import ALGORITHM, MAX_EXPIRES_SECONDS, as_utc, key_state, x_oss_date

__all__ = ["policy_json", "post_policy_v1", "post_policy_v4"]


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
    state = key_state(credentials, stamp[:8], region, "oss", when)
    credential = f"{credentials.access_key_id}/{state.scope}"
    fields = {
        "x-oss-signature-version": ALGORITHM,
        "x-oss-credential": credential,
        "x-oss-date": stamp,
    }
    if credentials.security_token:
        fields["x-oss-security-token"] = credentials.security_token
    required: list[Any] = [{"bucket": bucket}, *({k: v} for k, v in fields.items())]
    required.extend(conditions)
    policy = _encode_policy(until, required)
    inner, outer = state.pads[0].copy(), state.pads[1].copy()
    inner.update(policy)
    outer.update(inner.digest())  # HMAC-SHA256(SigningKey, base64 policy)
    return {"policy": policy.decode(), **fields, "x-oss-signature": outer.hexdigest()}


def post_policy_v1(
    credentials: Credentials, *, conditions: list[Any], expiration: datetime
) -> dict[str, str]:
    """PostObject form fields signed with POST V1 (HMAC-SHA1).

    Per https://help.aliyun.com/en/oss/developer-reference/signature-version-1:
    ``Signature`` = base64(HMAC-SHA1(AccessKeySecret, base64 policy)); STS
    credentials add the ``x-oss-security-token`` form field.  Prefer V4.
    """
    policy = _encode_policy(as_utc(expiration), list(conditions))
    digest = hmac.digest(credentials.access_key_secret.encode(), policy, "sha1")
    fields = {
        "OSSAccessKeyId": credentials.access_key_id,
        "policy": policy.decode(),
        "Signature": base64.b64encode(digest).decode(),
    }
    if credentials.security_token:
        fields["x-oss-security-token"] = credentials.security_token
    return fields


def _encode_policy(expiration: datetime, conditions: list[Any]) -> bytes:
    """base64 of the policy JSON, as ``json.dumps(..., separators=(",", ":"))`` writes it."""
    e = expiration
    iso = "%04d-%02d-%02dT%02d:%02d:%02d.%03dZ" % (  # noqa: UP031 (the fastest way)
        (e.year, e.month, e.day, e.hour, e.minute, e.second, e.microsecond // 1000)
    )
    return base64.b64encode(policy_json({"expiration": iso, "conditions": conditions}))


def policy_json(document: dict[str, Any]) -> bytes:
    """``json.dumps(document, separators=(",", ":")).encode()``, through orjson when identical.

    orjson writes the same text for ASCII output without DEL (both escape
    ``"``, ``\\`` and C0 controls the same way, neither escapes ``/``); a
    document with any other character (which ``json.dumps`` writes as
    ``\\uXXXX``), a float (written differently) or anything orjson cannot
    write goes through ``json.dumps``.
    """
    if not _plain(document):
        return json.dumps(document, separators=(",", ":")).encode()
    try:
        data = orjson.dumps(document)
    except orjson.JSONEncodeError:
        return json.dumps(document, separators=(",", ":")).encode()
    if data.isascii() and b"\x7f" not in data:
        return data
    return json.dumps(document, separators=(",", ":")).encode()


_SCALARS = frozenset({str, int, bool, type(None)})


def _plain(document: dict[str, Any]) -> bool:
    """Strings, ints, booleans and nulls only, in lists and objects at most three deep."""
    scalars = _SCALARS
    for value in document.values():
        for item in value if type(value) is list else (value,):
            kind = type(item)
            if kind is list:
                for member in item:
                    if type(member) not in scalars:
                        return False
            elif kind is dict:
                for member in item.values():
                    if type(member) not in scalars:
                        return False
            elif kind not in scalars:
                return False
    return True
