"""PostObject policies, V4 and V1, checked by an independent implementation of the docs."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import timedelta
from typing import Any

import pytest

from broker.models import Credentials
from broker.signing import post_policy_v1, post_policy_v4
from broker.signing.post_policy import policy_json
from tests.signing.sdk_oracle import LONG_TERM, STS, T0

# --- PostObject, checked by an independent implementation of the documented algorithm ---
# https://help.aliyun.com/en/oss/developer-reference/signature-version-4-recommend
# https://help.aliyun.com/en/oss/developer-reference/signature-version-1

EXPIRES_AT = T0 + timedelta(minutes=10)


def _doc_v4_signature(secret: str, day: str, region: str, string_to_sign: str) -> str:
    key = hmac.new(f"aliyun_v4{secret}".encode(), day.encode(), hashlib.sha256).digest()
    key = hmac.new(key, region.encode(), hashlib.sha256).digest()
    key = hmac.new(key, b"oss", hashlib.sha256).digest()
    key = hmac.new(key, b"aliyun_v4_request", hashlib.sha256).digest()
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def _v4_fields(creds: Credentials, conditions: list[Any]) -> dict[str, str]:
    return post_policy_v4(
        creds,
        bucket="examplebucket",
        region="cn-hangzhou",
        conditions=conditions,
        expiration=EXPIRES_AT,
        signing_time=T0,
    )


EXTRA_CONDITIONS: list[Any] = [
    ["starts-with", "$key", "avatars/alice/"],
    ["content-length-range", 0, 5242880],
    ["eq", "$content-type", "image/png"],
]


def test_post_policy_v4_signature_follows_documented_algorithm() -> None:
    """x-oss-signature = hex(HMAC-SHA256(V4 signing key, base64 policy))."""
    fields = _v4_fields(STS, EXTRA_CONDITIONS)
    assert fields["x-oss-signature-version"] == "OSS4-HMAC-SHA256"
    assert fields["x-oss-date"] == "20240506T070809Z"
    assert fields["x-oss-credential"] == "STS.NTest/20240506/cn-hangzhou/oss/aliyun_v4_request"
    assert fields["x-oss-security-token"] == STS.security_token
    expected = _doc_v4_signature(STS.access_key_secret, "20240506", "cn-hangzhou", fields["policy"])
    assert fields["x-oss-signature"] == expected


def test_post_policy_v4_policy_carries_required_conditions() -> None:
    """The policy holds expiration, bucket, the x-oss-* form values and the extra conditions."""
    fields = _v4_fields(STS, EXTRA_CONDITIONS)
    policy = json.loads(base64.b64decode(fields["policy"]))
    assert policy["expiration"] == "2024-05-06T07:18:09.000Z"
    conditions = policy["conditions"]
    for name in ("x-oss-signature-version", "x-oss-credential", "x-oss-date"):
        assert {name: fields[name]} in conditions
    assert {"x-oss-security-token": STS.security_token} in conditions
    assert {"bucket": "examplebucket"} in conditions
    for condition in EXTRA_CONDITIONS:
        assert condition in conditions


def test_post_policy_v4_without_token() -> None:
    """Long-term keys produce neither a token field nor a token condition."""
    fields = _v4_fields(LONG_TERM, [])
    assert "x-oss-security-token" not in fields
    assert "x-oss-security-token" not in base64.b64decode(fields["policy"]).decode()
    assert fields["x-oss-signature"] == _doc_v4_signature(
        LONG_TERM.access_key_secret, "20240506", "cn-hangzhou", fields["policy"]
    )


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(days=7, seconds=1)])
def test_post_policy_v4_lifetime_limits(lifetime: timedelta) -> None:
    """A POST V4 policy must expire after its signing time and within 7 days."""
    with pytest.raises(ValueError, match="7 days"):
        post_policy_v4(
            STS,
            bucket="examplebucket",
            region="cn-hangzhou",
            conditions=[],
            expiration=T0 + lifetime,
            signing_time=T0,
        )


def test_post_policy_v1_signature_follows_documented_algorithm() -> None:
    """Signature = base64(HMAC-SHA1(secret, base64 policy)); the token rides along."""
    fields = post_policy_v1(STS, conditions=EXTRA_CONDITIONS, expiration=EXPIRES_AT)
    digest = hmac.new(STS.access_key_secret.encode(), fields["policy"].encode(), hashlib.sha1)
    assert fields["Signature"] == base64.b64encode(digest.digest()).decode()
    assert fields["OSSAccessKeyId"] == STS.access_key_id
    assert fields["x-oss-security-token"] == STS.security_token
    policy = json.loads(base64.b64decode(fields["policy"]))
    assert policy == {"expiration": "2024-05-06T07:18:09.000Z", "conditions": EXTRA_CONDITIONS}


def test_post_policy_v1_without_token() -> None:
    """Long-term keys sign V1 policies without a token field."""
    assert "x-oss-security-token" not in post_policy_v1(
        LONG_TERM, conditions=[], expiration=EXPIRES_AT
    )


# --- the policy document's JSON: orjson where it writes what json.dumps writes ---

_CHARS = [chr(c) for c in range(0x300)] + ["\u2028", "\u2029", "\ufeff", "😀", "中"]


def test_policy_json_is_json_dumps_for_every_character() -> None:
    """policy_json writes json.dumps's bytes for any character in keys and values."""
    for char in _CHARS:
        document = {"expiration": char, "conditions": [["eq", "$key", f"a{char}b"], {char: char}]}
        assert policy_json(document) == json.dumps(document, separators=(",", ":")).encode()


@pytest.mark.parametrize(
    "conditions",
    [
        [["content-length-range", 0, 2**70]],
        [["content-length-range", 0.5, 1e16]],
        [1e16, [[1.0]], {"a": {"b": 1.0}}],
        [["eq", "$key", "x"], {"bucket": "b"}, True, None, -1],
    ],
)
def test_policy_json_falls_back_where_orjson_would_differ(conditions: list[Any]) -> None:
    """Floats, huge ints and deep nesting give json.dumps's bytes too."""
    document = {"expiration": "2024-01-01T00:00:00.000Z", "conditions": conditions}
    assert policy_json(document) == json.dumps(document, separators=(",", ":")).encode()
