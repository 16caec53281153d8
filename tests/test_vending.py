"""The use cases without HTTP: the real STS emulator, the real credential cache, a moved clock."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from broker import vending
from broker.errors import AccessDenied, RequestInvalid, UpstreamError
from broker.models import Principal
from broker.services import Services
from broker.uploads import PostPolicyBody, PresignBody
from tests.conftest import FakeClock, StsHarness

ALICE = Principal("alice", ("browser",))
SVC_A = Principal("svc-a", ("internal",))
AVATAR: dict[str, Any] = {
    "policy": "avatar-upload",
    "key": "avatars/alice/me.png",
    "content_type": "image/png",
    "content_length": 1024,  # avatar-upload limits object sizes: the size is signed
}


def _stale_served(services: Services) -> float:
    value = services.metrics.registry.get_sample_value("broker_stale_credentials_served_total")
    return value or 0.0


def _post_policy_document(fields: dict[str, str]) -> dict[str, Any]:
    document: dict[str, Any] = json.loads(base64.b64decode(fields["policy"]))
    return document


# --- issue credentials ---------------------------------------------------------


async def test_second_issue_is_a_cache_hit_after_one_sts_call(
    services: Services, sts: StsHarness
) -> None:
    """The first issue misses and calls STS; the second is a hit with the same credentials."""
    first = await vending.issue_credentials(services, ALICE, "avatar-upload")
    second = await vending.issue_credentials(services, ALICE, "avatar-upload")
    assert (first.cache, second.cache) == ("miss", "hit")
    assert second.credentials == first.credentials
    assert sts.emulator.assume_role_calls() == 1
    assert first.scope.prefix == "avatars/alice/"
    assert first.endpoint.host == "oss-cn-hangzhou.aliyuncs.com"
    assert first.expires_in == 900


async def test_issue_renders_the_callers_own_scope_into_the_sts_policy(
    services: Services, sts: StsHarness
) -> None:
    """AssumeRole carries the caller's rendered policy, role, duration and session name."""
    issued = await vending.issue_credentials(services, ALICE, "avatar-upload")
    (call,) = sts.emulator.calls
    assert call.params["Policy"] == issued.scope.document
    assert "examplebucket/avatars/alice/*" in call.params["Policy"]
    assert call.params["RoleArn"] == "acs:ram::1234567890123456:role/oss-avatar-upload"
    assert call.params["DurationSeconds"] == "900"
    assert call.params["RoleSessionName"] == "alice"


async def test_min_ttl_forces_a_fresh_token(
    services: Services, sts: StsHarness, clock: FakeClock
) -> None:
    """A cached token with less than min_ttl_seconds left is replaced by a fresh one."""
    first = await vending.issue_credentials(services, ALICE, "avatar-upload")
    clock.advance(400)  # 500 s left
    kept = await vending.issue_credentials(services, ALICE, "avatar-upload", ["500"])
    fresh = await vending.issue_credentials(services, ALICE, "avatar-upload", ["600"])
    assert (kept.cache, kept.credentials) == ("hit", first.credentials)
    assert fresh.cache == "refresh"
    assert fresh.credentials != first.credentials
    assert fresh.expires_in == 900
    assert sts.emulator.assume_role_calls() == 2


@pytest.mark.parametrize("values", [["841"], ["-1"], ["1e3"], [""], ["1", "1"]])
async def test_min_ttl_outside_the_policy_limit_is_refused_before_sts(
    services: Services, sts: StsHarness, values: list[str]
) -> None:
    """min_ttl_seconds is one whole number up to duration minus margin (840 here), or 400."""
    with pytest.raises(RequestInvalid, match="from 0 to 840"):
        await vending.issue_credentials(services, ALICE, "avatar-upload", values)
    assert sts.emulator.calls == []


async def test_min_ttl_is_a_requirement_for_credentials(
    services: Services, sts: StsHarness, clock: FakeClock
) -> None:
    """When STS fails, credentials asked for with min_ttl_seconds are an error, never stale."""
    await vending.issue_credentials(services, ALICE, "avatar-upload")
    clock.advance(400)
    sts.emulator.faults.update({"error_status": 500})
    with pytest.raises(UpstreamError):
        await vending.issue_credentials(services, ALICE, "avatar-upload", ["600"])
    assert _stale_served(services) == 0


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("service-uploads", AccessDenied),  # exists, but alice is not among its callers
        ("no-such-policy", AccessDenied),  # the same refusal: existence is not revealed
        ("UPPER", RequestInvalid),
        ("-leading", RequestInvalid),
    ],
)
async def test_unusable_policies_are_refused_before_sts(
    services: Services, sts: StsHarness, name: str, error: type[Exception]
) -> None:
    """A policy the caller may not use is 403 whether or not it exists; a bad name is 400."""
    with pytest.raises(error):
        await vending.issue_credentials(services, ALICE, name)
    assert sts.emulator.calls == []


# --- presign a URL -------------------------------------------------------------


async def test_presign_signs_a_put_for_a_key_under_the_prefix(
    services: Services, clock: FakeClock
) -> None:
    """A PUT URL for the key, the headers to send, and the policy's lifetime cap."""
    signed = await vending.presign_url(services, ALICE, PresignBody.model_validate(AVATAR))
    assert signed.method == "PUT"
    assert signed.url.startswith(
        "https://examplebucket.oss-cn-hangzhou.aliyuncs.com/avatars/alice/me.png?"
    )
    assert signed.signed_headers == {"Content-Type": "image/png", "Content-Length": "1024"}
    assert signed.expiration == datetime.fromtimestamp(clock(), UTC) + timedelta(seconds=600)
    assert (signed.expiry.seconds, signed.expiry.clamped) == (600, False)


async def test_presign_refuses_a_key_outside_the_prefix(
    services: Services, sts: StsHarness
) -> None:
    """Another caller's key is 403, and STS is never called."""
    body = PresignBody.model_validate({**AVATAR, "key": "avatars/bob/me.png"})
    with pytest.raises(AccessDenied, match="outside"):
        await vending.presign_url(services, ALICE, body)
    assert sts.emulator.calls == []


async def test_presign_refuses_an_action_the_policy_lacks(
    services: Services, sts: StsHarness
) -> None:
    """A GET on a put-only policy is 403, and STS is never called."""
    body = PresignBody.model_validate(
        {"policy": "avatar-upload", "key": "avatars/alice/me.png", "method": "GET"}
    )
    with pytest.raises(AccessDenied, match="does not allow get_object"):
        await vending.presign_url(services, ALICE, body)
    assert sts.emulator.calls == []


async def test_presign_clamps_to_the_tokens_remaining_validity(
    services: Services, sts: StsHarness, clock: FakeClock
) -> None:
    """A URL never outlives the token that signs it: the lifetime is clamped and says so."""
    body = PresignBody.model_validate(
        {"policy": "service-uploads", "key": "services/svc-a/f", "expires_seconds": 3600}
        | {"content_length": 1}
    )
    first = await vending.presign_url(services, SVC_A, body)
    clock.advance(30)  # 3570 s left: still above the 3540 s a fresh token is fetched for
    second = await vending.presign_url(services, SVC_A, body)
    assert (first.expiry.seconds, first.expiry.clamped) == (3600, False)
    assert (second.expiry.seconds, second.expiry.clamped) == (3570, True)
    assert second.expiry.requested_seconds == 3600
    assert sts.emulator.assume_role_calls() == 1


async def test_presign_falls_back_to_the_cached_token_when_sts_fails(
    services: Services, sts: StsHarness, clock: FakeClock
) -> None:
    """For signing, min_ttl is a preference: STS down, the still-valid token signs, clamped."""
    await vending.presign_url(services, ALICE, PresignBody.model_validate(AVATAR))
    clock.advance(400)  # 500 s left; the policy allows 550 s, so a fresh token is asked for
    sts.emulator.faults.update({"error_status": 500})
    signed = await vending.presign_url(
        services, ALICE, PresignBody.model_validate({**AVATAR, "expires_seconds": 550})
    )
    assert (signed.expiry.seconds, signed.expiry.clamped) == (500, True)
    assert sts.emulator.calls[-1].outcome != "issued"
    assert _stale_served(services) == 1


# --- sign a post policy --------------------------------------------------------


async def test_post_policy_is_signed_v4_by_default(services: Services, clock: FakeClock) -> None:
    """V4 fields, the caller's prefix as the key condition, the policy's lifetime cap."""
    body = PostPolicyBody.model_validate({"policy": "avatar-upload", "content_type": "image/png"})
    signed = await vending.sign_post_policy(services, ALICE, body)
    fields = signed.fields
    assert signed.host == "https://examplebucket.oss-cn-hangzhou.aliyuncs.com"
    assert fields["x-oss-signature-version"] == "OSS4-HMAC-SHA256"
    assert {"x-oss-credential", "x-oss-date", "x-oss-signature", "x-oss-security-token"} <= set(
        fields
    )
    assert not {"OSSAccessKeyId", "Signature"} & set(fields)
    assert (fields["key"], fields["Content-Type"]) == ("avatars/alice/${filename}", "image/png")
    assert signed.expiration == datetime.fromtimestamp(clock(), UTC) + timedelta(seconds=600)
    conditions = _post_policy_document(fields)["conditions"]
    assert ["starts-with", "$key", "avatars/alice/"] in conditions
    assert {"bucket": "examplebucket"} in conditions


async def test_post_policy_v1_when_asked(services: Services) -> None:
    """signature_version v1 gives OSSAccessKeyId/Signature fields and a bucket condition."""
    body = PostPolicyBody.model_validate(
        {"policy": "avatar-upload", "content_type": "image/png", "signature_version": "v1"}
    )
    signed = await vending.sign_post_policy(services, ALICE, body)
    fields = signed.fields
    assert {"OSSAccessKeyId", "Signature", "policy", "x-oss-security-token"} <= set(fields)
    assert not any(name.startswith("x-oss-signature") for name in fields)
    conditions = _post_policy_document(fields)["conditions"]
    assert conditions[0] == {"bucket": "examplebucket"}
    assert ["starts-with", "$key", "avatars/alice/"] in conditions


async def test_post_policy_needs_a_policy_that_allows_uploads(
    services: Services, sts: StsHarness
) -> None:
    """A read-only policy signs no upload form, and STS is never called."""
    body = PostPolicyBody.model_validate({"policy": "reports-read"})
    with pytest.raises(AccessDenied, match="does not allow uploads"):
        await vending.sign_post_policy(services, SVC_A, body)
    assert sts.emulator.calls == []


# --- the hot path ----------------------------------------------------------------


async def test_a_hit_reads_no_sts_and_counts_expires_in_from_one_clock_reading(
    services: Services, sts: StsHarness, clock: FakeClock
) -> None:
    """A hit's ExpiresIn is the token's expiry less the one clock reading of the request."""
    first = await vending.issue_credentials(services, ALICE, "avatar-upload")
    clock.advance(100.6)
    second = await vending.issue_credentials(services, ALICE, "avatar-upload")
    assert second.cache == "hit"
    assert second.issued_at == clock()
    assert second.expires_in == int(first.credentials.expires_at - clock()) == 799
    assert sts.emulator.assume_role_calls() == 1
