"""The STS client against the STS emulator (a real server): what it sends, parses and raises."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from alibabacloud_tea_openapi.exceptions import ThrottlingException

from broker.config import StsSettings
from broker.credentials.sts import (
    StsClient,
    _translate_response_error,
    parse_expiration,
    static_credential,
)
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from broker.errors import UpstreamError, UpstreamThrottled, UpstreamTimeout, UpstreamUnavailable
from broker.models import AssumeRoleRequest, OidcToken
from broker.names import format_sts_time
from tests.conftest import SOURCE_KEY_ID, SOURCE_SECRET, FakeClock, StsHarness, free_port
from tests.oidc_tokens import PROVIDER_ARN, IdentityProvider, identity_provider

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


THROTTLING_CODES = ["Throttling", "Throttling.User", "Throttling.Api", "Throttling.Tenant"]


@pytest.mark.parametrize("code", THROTTLING_CODES)
async def test_every_throttling_code_becomes_upstream_throttled(
    sts: StsHarness, clock: FakeClock, code: str
) -> None:
    """Each Throttling* code (prefix match) is UpstreamThrottled: 503, Retry-After, retryable."""
    sts.emulator.faults.update({"always": f"throttle:{code}"})
    with pytest.raises(UpstreamThrottled) as caught:
        await _client(sts, clock).assume_role(_request())
    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert caught.value.retry_after_seconds == 1
    assert caught.value.context["sts_code"] == code


@pytest.mark.parametrize(("millis", "seconds"), [(1, 1), (1000, 1), (2500, 3), (None, 1)])
def test_the_sdks_retry_after_is_milliseconds(millis: int | None, seconds: int) -> None:
    """A ThrottlingException's retry_after (x-acs-retry-after, in ms) becomes whole seconds."""
    err = ThrottlingException(status_code=400, code="Throttling.User", retry_after=millis)
    translated = _translate_response_error(err, ROLE)
    assert isinstance(translated, UpstreamThrottled)
    assert translated.retry_after_seconds == seconds


@pytest.mark.parametrize("status", [500, 502, 503, 504])
async def test_5xx_answers_are_retryable_upstream_unavailable(
    sts: StsHarness, clock: FakeClock, status: int
) -> None:
    """STS answering 5xx (the SDK's ServerException) is UpstreamUnavailable: 503, Retry-After."""
    sts.emulator.faults.update({"always": f"error:{status}"})
    with pytest.raises(UpstreamUnavailable) as caught:
        await _client(sts, clock).assume_role(_request())
    assert (caught.value.status, caught.value.retryable) == (503, True)
    assert caught.value.retry_after_seconds == 1
    assert caught.value.context["sts_status"] == status


@pytest.mark.parametrize(
    "outcome", ["reset", "truncated", "garbage", "html:502", "html:504", "html:403"]
)
async def test_no_usable_answer_is_retryable_upstream_unavailable(
    sts: StsHarness, clock: FakeClock, outcome: str
) -> None:
    """Reset, truncated, garbage or HTML bodies are no usable answer: 503, retryable."""
    sts.emulator.faults.update({"always": outcome})
    with pytest.raises(UpstreamUnavailable) as caught:
        await _client(sts, clock).assume_role(_request())
    assert caught.value.retryable is True
    assert sts.emulator.calls[-1].outcome == f"fault:{outcome}"


async def test_nothing_listening_is_retryable_upstream_unavailable(clock: FakeClock) -> None:
    """A refused connection is UpstreamUnavailable, retryable."""
    client = StsClient(
        StsSettings(endpoint=f"http://127.0.0.1:{free_port()}", timeout_seconds=2),
        credential=static_credential(SOURCE_KEY_ID, SOURCE_SECRET),
        clock=clock,
    )
    with pytest.raises(UpstreamUnavailable) as caught:
        await client.assume_role(_request())
    assert caught.value.retryable is True


@pytest.mark.parametrize(
    "code", ["NoPermission", "EntityNotExist.Role", "InvalidParameter.RoleArn", "MissingRoleArn"]
)
async def test_client_errors_keep_their_code_and_are_not_retryable(
    sts: StsHarness, clock: FakeClock, code: str
) -> None:
    """A 4xx client error is a plain UpstreamError (502) naming STS's code, never retried."""
    sts.emulator.faults.update({"always": f"error:{code}"})
    with pytest.raises(UpstreamError) as caught:
        await _client(sts, clock).assume_role(_request())
    assert type(caught.value) is UpstreamError
    assert (caught.value.status, caught.value.retryable) == (502, False)
    assert caught.value.retry_after_seconds is None
    assert caught.value.context["sts_code"] == code


async def test_a_bad_signature_is_not_retryable(sts: StsHarness, clock: FakeClock) -> None:
    """SignatureDoesNotMatch is a client error (502, not retried) and never echoes the secret."""
    with pytest.raises(UpstreamError) as caught:
        await _client(sts, clock, secret="not-the-secret").assume_role(_request())
    assert caught.value.retryable is False
    assert caught.value.context["sts_code"] == "SignatureDoesNotMatch"
    assert SOURCE_SECRET not in str(caught.value.context)


async def test_a_slow_answer_is_upstream_timeout(sts: StsHarness, clock: FakeClock) -> None:
    """No answer within timeout_seconds is UpstreamTimeout: 504, retryable, with Retry-After."""
    sts.emulator.faults.update({"delay_seconds": 1.0})
    with pytest.raises(UpstreamTimeout) as caught:
        await _client(sts, clock, timeout=0.1).assume_role(_request())
    assert (caught.value.status, caught.value.retryable) == (504, True)
    assert caught.value.retry_after_seconds == 1


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        ("credentials:missing", "carries no credentials"),
        ("expiration:missing", "no Expiration"),
        ("expiration:unparseable", "unparseable Expiration"),
        ("expiration:past", "expire within the refresh margin"),
        ("expiration:far_future", "further out than DurationSeconds allows"),
    ],
)
async def test_unusable_credentials_are_refused_not_retried(
    sts: StsHarness, clock: FakeClock, outcome: str, message: str
) -> None:
    """A 200 without credentials, or with an Expiration missing, garbled, past or absurd: 502."""
    sts.emulator.faults.update({"always": outcome})
    with pytest.raises(UpstreamError, match=message) as caught:
        await _client(sts, clock).assume_role(_request())
    assert type(caught.value) is UpstreamError
    assert caught.value.retryable is False


async def test_local_clock_behind_sts_expiry_is_capped_at_start_plus_duration(
    sts: StsHarness, clock: FakeClock
) -> None:
    """STS 600 s ahead says now+600+3600: the token is kept only to local start + 3600."""
    sts.emulator.faults.update({"clock_skew_seconds": 600})
    credentials = await _client(sts, clock).assume_role(_request(duration_seconds=3600))
    issued = sts.emulator.issued[credentials.access_key_id]
    assert issued.expires_at == clock() + 600 + 3600
    assert credentials.expires_at == clock() + 3600
    assert credentials.expiration_iso() == format_sts_time(
        datetime.fromtimestamp(clock() + 3600, UTC)
    )


async def test_local_clock_ahead_of_sts_keeps_the_earlier_expiry(
    sts: StsHarness, clock: FakeClock
) -> None:
    """STS 600 s behind: Expiration looks 600 s short; that shorter, still usable, time is kept."""
    sts.emulator.faults.update({"clock_skew_seconds": -600})
    credentials = await _client(sts, clock).assume_role(_request(duration_seconds=900))
    assert credentials.expires_at == clock() + 900 - 600


async def test_skew_beyond_openapis_tolerance_is_refused_by_sts(
    sts: StsHarness, clock: FakeClock
) -> None:
    """With STS's clock 16 minutes off, STS refuses the signature date: a 502 client error."""
    sts.emulator.faults.update({"clock_skew_seconds": 960})
    with pytest.raises(UpstreamError) as caught:
        await _client(sts, clock).assume_role(_request())
    assert caught.value.context["sts_code"] == "InvalidTimeStamp.Expired"
    assert caught.value.retryable is False


@pytest.mark.parametrize(("lifetime", "usable"), [(300, True), (900 + 900, True), (9000, False)])
async def test_the_bound_on_expiration_is_duration_plus_the_accepted_skew(
    clock: FakeClock, lifetime: int, usable: bool
) -> None:
    """Within DurationSeconds + 900 s (+ the timeout) the cap applies; further out is refused."""
    emulator = StsEmulator(
        access_keys={SOURCE_KEY_ID: SOURCE_SECRET}, clock=clock, issued_lifetime_seconds=lifetime
    )
    runner, url = await start_sts_emulator(emulator)
    try:
        client = _client(StsHarness(emulator, url), clock)
        if not usable:
            with pytest.raises(UpstreamError, match="further out"):
                await client.assume_role(_request())
            return
        credentials = await client.assume_role(_request())
    finally:
        await runner.cleanup()
    assert credentials.expires_at == clock() + min(lifetime, 900)


async def test_health_follows_the_latest_attempts(sts: StsHarness, clock: FakeClock) -> None:
    """StsHealth: unknown, then degraded after a retryable failure, ok after any real answer."""
    client = _client(sts, clock)
    assert client.health.state == "unknown"
    sts.emulator.faults.update({"sequence": ["error:503", "reset", "error:NoPermission", "ok"]})
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable):
            await client.assume_role(_request())
    assert (client.health.state, client.health.consecutive_failures) == ("degraded", 2)
    assert client.health.last_error == "UpstreamUnavailable"
    with pytest.raises(UpstreamError):
        await client.assume_role(_request())  # STS answered: it is up
    assert client.health.state == "ok"
    await client.assume_role(_request())
    assert (client.health.state, client.health.attempts) == ("ok", 4)


async def test_source_credentials_resolve(sts: StsHarness, clock: FakeClock) -> None:
    """The health check sees the broker's own identity (here a static AccessKey) resolve."""
    assert await _client(sts, clock).check_source_credentials()


def test_source_credential_is_opaque_and_masked() -> None:
    """A SourceCredential's repr shows neither the AccessKey id nor its secret."""
    text = repr(static_credential(SOURCE_KEY_ID, SOURCE_SECRET))
    assert SOURCE_KEY_ID not in text
    assert SOURCE_SECRET not in text


# --- AssumeRoleWithOIDC (federation: oidc) -------------------------------------------------


def _federated(clock: FakeClock, idp: IdentityProvider, **claims: object) -> AssumeRoleRequest:
    token = idp.token(clock(), **claims)
    expires = float(claims.get("exp", int(clock()) + 600))  # type: ignore[arg-type]
    return _request(
        role_session_name="u.alice",
        oidc_provider_arn=PROVIDER_ARN,
        federation=f"oidc {PROVIDER_ARN} {idp.issuer} alice",
        oidc_token=OidcToken(token, idp.issuer, expires),
    )


@pytest.fixture
def idp(sts: StsHarness) -> IdentityProvider:
    provider = identity_provider()
    sts.emulator.oidc_providers[PROVIDER_ARN] = provider.provider()
    return provider


async def test_federated_fetch_calls_assume_role_with_oidc_anonymously_with_the_policy(
    sts: StsHarness, clock: FakeClock, idp: IdentityProvider
) -> None:
    """A federated request goes out as AssumeRoleWithOIDC: no AccessKey, the token, the Policy."""
    credentials = await _client(sts, clock).fetch(_federated(clock, idp))
    (call,) = sts.emulator.calls
    assert call.params["Action"] == "AssumeRoleWithOIDC"
    assert call.access_key_id == ""
    assert call.params["OIDCProviderArn"] == PROVIDER_ARN
    assert call.params["OIDCToken"] == "<redacted>"
    assert call.params["Policy"] == POLICY
    assert call.params["RoleSessionName"] == "u.alice"
    assert sts.emulator.issued[credentials.access_key_id].policy == POLICY


async def test_unfederated_fetch_still_calls_assume_role(sts: StsHarness, clock: FakeClock) -> None:
    """Without federation, fetch is the broker's own signed AssumeRole."""
    await _client(sts, clock).fetch(_request())
    (call,) = sts.emulator.calls
    assert call.access_key_id == SOURCE_KEY_ID
    assert "Action" not in call.params


async def test_federated_credentials_never_outlive_the_callers_token(
    sts: StsHarness, clock: FakeClock, idp: IdentityProvider
) -> None:
    """STS grants DurationSeconds (900 s), but the token expires in 300 s: capped to the token."""
    request = _federated(clock, idp, exp=int(clock()) + 300)
    credentials = await _client(sts, clock).fetch(request)
    assert credentials.expires_at == int(clock()) + 300
    assert sts.emulator.issued[credentials.access_key_id].expires_at == clock() + 900


async def test_a_token_about_to_expire_is_never_sent_to_sts(
    sts: StsHarness, clock: FakeClock, idp: IdentityProvider
) -> None:
    """A token with less than the refresh margin left is refused before any call."""
    request = _federated(clock, idp, exp=int(clock()) + 30)
    with pytest.raises(UpstreamError, match="expires too soon"):
        await _client(sts, clock).fetch(request)
    assert sts.emulator.received == 0


async def test_sts_refusing_the_token_is_a_non_retryable_upstream_error(
    sts: StsHarness, clock: FakeClock, idp: IdentityProvider
) -> None:
    """STS's AuthenticationFail.* answer keeps its code and is not retried."""
    with pytest.raises(UpstreamError) as caught:
        await _client(sts, clock).fetch(_federated(clock, idp, aud="another-app"))
    assert caught.value.retryable is False
    assert caught.value.context["sts_code"] == "AuthenticationFail.OIDCToken.AudienceNotMatch"
