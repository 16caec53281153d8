"""The STS client against the STS emulator (a real server): what it sends, parses and raises."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from broker.config import StsSettings
from broker.credentials.sts import (
    THROTTLING_CODES,
    StsClient,
    parse_expiration,
    static_credential,
)
from broker.errors import UpstreamError, UpstreamThrottled, UpstreamTimeout, UpstreamUnavailable
from broker.models import AssumeRoleRequest
from tests.conftest import SOURCE_KEY_ID, SOURCE_SECRET, FakeClock, StsHarness

ROLE = "acs:ram::1234567890123456:role/oss-avatar-upload"
POLICY = json.dumps(
    {
        "Version": "1",
        "Statement": [
            {
                "Effect": "Allow",
                "Action": ["oss:PutObject"],
                "Resource": ["acs:oss:*:*:examplebucket/avatars/alice/*"],
            }
        ],
    },
    separators=(",", ":"),
)


def _request(**changes: object) -> AssumeRoleRequest:
    fields: dict[str, object] = {
        "role_arn": ROLE,
        "policy": POLICY,
        "duration_seconds": 900,
        "role_session_name": "alice",
    }
    return AssumeRoleRequest(**(fields | changes))  # type: ignore[arg-type]


def _client(
    sts: StsHarness, clock: FakeClock, *, secret: str = SOURCE_SECRET, timeout: float = 2.0
) -> StsClient:
    return StsClient(
        StsSettings(endpoint=sts.url, timeout_seconds=timeout),
        credential=static_credential(SOURCE_KEY_ID, secret),
        clock=clock,
        min_validity_seconds=60,
    )


async def test_sends_the_inline_policy_and_every_field(sts: StsHarness, clock: FakeClock) -> None:
    """AssumeRole carries the Policy verbatim, with role, session name, duration and external id."""
    await _client(sts, clock).assume_role(_request(external_id="ext-1"))
    (call,) = sts.emulator.calls
    assert call.params["Policy"] == POLICY
    assert call.params["RoleArn"] == ROLE
    assert call.params["RoleSessionName"] == "alice"
    assert call.params["DurationSeconds"] == "900"
    assert call.params["ExternalId"] == "ext-1"
    assert call.access_key_id == SOURCE_KEY_ID


async def test_returns_the_issued_credentials_with_a_utc_expiration(
    sts: StsHarness, clock: FakeClock
) -> None:
    """The reply becomes Credentials whose expiration is the issued one, an aware UTC datetime."""
    credentials = await _client(sts, clock).assume_role(_request())
    issued = sts.emulator.issued[credentials.access_key_id]
    assert credentials.access_key_secret == issued.access_key_secret
    assert credentials.security_token == issued.security_token
    assert credentials.expiration.tzinfo is UTC
    assert credentials.expires_at == issued.expires_at == clock() + 900


def test_parse_expiration_reads_the_sts_format_only() -> None:
    """``2026-11-21T05:00:00Z`` parses to aware UTC; anything else is an UpstreamError."""
    assert parse_expiration("2026-11-21T05:00:00Z") == datetime(2026, 11, 21, 5, tzinfo=UTC)
    with pytest.raises(UpstreamError, match="no Expiration"):
        parse_expiration(None)
    for bad in ("2026-11-21 05:00:00", "2026-11-21T05:00:00+08:00", "tomorrow"):
        with pytest.raises(UpstreamError, match="unparseable Expiration"):
            parse_expiration(bad)


@pytest.mark.parametrize("code", sorted(THROTTLING_CODES))
async def test_throttling_codes_become_upstream_throttled(
    sts: StsHarness, clock: FakeClock, code: str
) -> None:
    """Each STS throttling code is UpstreamThrottled: 503, Retry-After, retryable."""
    sts.emulator.faults.update({"throttle": True, "throttle_code": code})
    with pytest.raises(UpstreamThrottled) as caught:
        await _client(sts, clock).assume_role(_request())
    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert caught.value.retry_after_seconds is not None
    assert caught.value.context["sts_code"] == code


async def test_a_503_becomes_upstream_unavailable(sts: StsHarness, clock: FakeClock) -> None:
    """STS answering 503 is UpstreamUnavailable: retryable, with Retry-After."""
    sts.emulator.faults.update({"error_status": 503})
    with pytest.raises(UpstreamUnavailable) as caught:
        await _client(sts, clock).assume_role(_request())
    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert caught.value.retry_after_seconds == 1


async def test_other_sts_errors_keep_their_code_and_are_not_retryable(
    sts: StsHarness, clock: FakeClock
) -> None:
    """A 500 or a bad signature is a plain UpstreamError naming STS's code, not retryable."""
    sts.emulator.faults.update({"error_status": 500, "remaining": 1})
    with pytest.raises(UpstreamError) as server_error:
        await _client(sts, clock).assume_role(_request())
    with pytest.raises(UpstreamError) as bad_signature:
        await _client(sts, clock, secret="not-the-secret").assume_role(_request())
    for caught in (server_error, bad_signature):
        assert type(caught.value) is UpstreamError
        assert caught.value.retryable is False
    assert bad_signature.value.context["sts_code"] == "SignatureDoesNotMatch"
    assert SOURCE_SECRET not in str(bad_signature.value.context)


async def test_a_slow_answer_is_upstream_timeout(sts: StsHarness, clock: FakeClock) -> None:
    """No answer within timeout_seconds is UpstreamTimeout (504), retryable."""
    sts.emulator.faults.update({"delay_seconds": 1.0})
    with pytest.raises(UpstreamTimeout) as caught:
        await _client(sts, clock, timeout=0.1).assume_role(_request())
    assert (caught.value.status, caught.value.retryable) == (504, True)


@pytest.mark.parametrize("fault", ["reset_connection", "malformed_body"])
async def test_transport_failures_are_retryable_upstream_errors(
    sts: StsHarness, clock: FakeClock, fault: str
) -> None:
    """A reset connection or an unreadable reply is an UpstreamError marked retryable."""
    sts.emulator.faults.update({fault: True})
    with pytest.raises(UpstreamError) as caught:
        await _client(sts, clock).assume_role(_request())
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("omit_credentials", "carries no credentials"),
        ("omit_expiration", "no Expiration"),
        ("expired_credentials", "expire within the refresh margin"),
    ],
)
async def test_incomplete_replies_are_refused(
    sts: StsHarness, clock: FakeClock, fault: str, message: str
) -> None:
    """A 200 reply without credentials, without Expiration or already expiring is an error."""
    sts.emulator.faults.update({fault: True})
    with pytest.raises(UpstreamError, match=message) as caught:
        await _client(sts, clock).assume_role(_request())
    assert caught.value.retryable is False


async def test_source_credentials_resolve(sts: StsHarness, clock: FakeClock) -> None:
    """The health check sees the broker's own identity (here a static AccessKey) resolve."""
    assert await _client(sts, clock).check_source_credentials()


def test_source_credential_is_opaque_and_masked() -> None:
    """A SourceCredential's repr shows neither the AccessKey id nor its secret."""
    text = repr(static_credential(SOURCE_KEY_ID, SOURCE_SECRET))
    assert SOURCE_KEY_ID not in text
    assert SOURCE_SECRET not in text
