"""The STS emulator, driven over real sockets by the official async STS SDK."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import aiohttp
import pytest
from alibabacloud_sts20150401 import models as sts_models
from alibabacloud_sts20150401.client import Client as StsSdkClient
from alibabacloud_tea_openapi.exceptions import ClientException, ServerException
from alibabacloud_tea_openapi.utils import Utils as OpenApiUtils
from alibabacloud_tea_openapi.utils_models import Config
from darabonba.exceptions import UnretryableException
from darabonba.request import DaraRequest
from darabonba.runtime import RuntimeOptions

from broker.dev.emulators.sts import StsEmulator, start_sts_emulator
from tests.oidc_tokens import PROVIDER_ARN, IdentityProvider, identity_provider, other_key

ACCESS_KEY_ID = "LTAI5tEmulatorTestKey"
ACCESS_KEY_SECRET = "emulator-test-secret-value"
ROLE_ARN = "acs:ram::1234567890123456:role/oss-avatar-upload"
LONG_ROLE_ARN = "acs:ram::1234567890123456:role/long-sessions"
FIXED_NOW = 1_800_000_000.0
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


@pytest.fixture
def emulator() -> StsEmulator:
    return StsEmulator(
        access_keys={ACCESS_KEY_ID: ACCESS_KEY_SECRET},
        clock=lambda: FIXED_NOW,
        role_max_duration_seconds={LONG_ROLE_ARN: 43200},
    )


@pytest.fixture
async def base_url(emulator: StsEmulator) -> AsyncIterator[str]:
    runner, url = await start_sts_emulator(emulator)
    yield url
    await runner.cleanup()


def sdk_client(
    base_url: str,
    *,
    access_key_id: str = ACCESS_KEY_ID,
    access_key_secret: str = ACCESS_KEY_SECRET,
    read_timeout_ms: int | None = None,
) -> StsSdkClient:
    config = Config(
        endpoint=base_url.removeprefix("http://"),
        protocol="http",
        region_id="cn-hangzhou",
        access_key_id=access_key_id,
        access_key_secret=access_key_secret,
        read_timeout=read_timeout_ms,
    )
    return StsSdkClient(config)


def assume_role_request(**overrides: Any) -> sts_models.AssumeRoleRequest:
    values: dict[str, Any] = {
        "role_arn": ROLE_ARN,
        "role_session_name": "alice",
        "duration_seconds": 900,
        "policy": POLICY,
    }
    values.update(overrides)
    return sts_models.AssumeRoleRequest(**values)


async def assume_role(base_url: str, **overrides: Any) -> sts_models.AssumeRoleResponse:
    return await sdk_client(base_url).assume_role_async(assume_role_request(**overrides))


def epoch(expiration: str) -> float:
    return datetime.strptime(expiration, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def signed_raw_request(
    base_url: str, *, date: str | None = None, nonce: str = "fixed-nonce", body: bytes = b""
) -> tuple[str, dict[str, str]]:
    """A request signed by the SDK's own signer, for replay and freshness checks."""
    query = {"RoleArn": ROLE_ARN, "RoleSessionName": "alice", "Policy": POLICY}
    request = DaraRequest()
    request.method = "POST"
    request.pathname = "/"
    request.query = query
    request.headers = {
        "host": base_url.removeprefix("http://"),
        "x-acs-action": "AssumeRole",
        "x-acs-version": "2015-04-01",
        "x-acs-date": date or OpenApiUtils.get_timestamp(),
        "x-acs-signature-nonce": nonce,
        "x-acs-content-sha256": hashlib.sha256(b"").hexdigest(),
    }
    request.headers["Authorization"] = OpenApiUtils.get_authorization(
        request,
        "ACS3-HMAC-SHA256",
        hashlib.sha256(body).hexdigest(),
        ACCESS_KEY_ID,
        ACCESS_KEY_SECRET,
    )
    return f"{base_url}/?{urlencode(query)}", dict(request.headers)


async def post_raw(url: str, headers: dict[str, str], body: bytes = b"") -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, headers=headers, data=body) as response,
    ):
        assert response.content_type == "application/json"
        return response.status, await response.json()


async def test_assume_role_returns_credentials_recorded_in_issued(
    emulator: StsEmulator, base_url: str
) -> None:
    """A valid signed AssumeRole returns STS-shaped credentials that the emulator remembers."""
    response = await assume_role(base_url, external_id="abcd1234")

    body = response.body
    credentials = body.credentials
    assert response.status_code == 200
    assert credentials.access_key_id.startswith("STS.")
    assert epoch(credentials.expiration) == FIXED_NOW + 900
    assert body.assumed_role_user.arn == f"{ROLE_ARN}/alice"
    assert body.assumed_role_user.assumed_role_id.endswith(":alice")
    issued = emulator.issued[credentials.access_key_id]
    assert issued.access_key_secret == credentials.access_key_secret
    assert issued.policy == POLICY
    assert (issued.role_arn, issued.role_session_name) == (ROLE_ARN, "alice")
    assert emulator.lookup_security_token(credentials.security_token) == issued
    assert credentials.security_token not in repr(issued)
    assert emulator.assume_role_calls() == 1
    call = emulator.calls[0]
    assert (call.access_key_id, call.outcome) == (ACCESS_KEY_ID, "issued")
    assert call.params["Policy"] == POLICY
    assert call.params["ExternalId"] == "abcd1234"


async def test_lifetime_caps_the_token_below_duration() -> None:
    """With lifetime_seconds set, tokens live min(DurationSeconds, lifetime)."""
    short = StsEmulator(
        access_keys={ACCESS_KEY_ID: ACCESS_KEY_SECRET}, clock=lambda: FIXED_NOW, lifetime_seconds=5
    )
    runner, url = await start_sts_emulator(short)
    try:
        response = await assume_role(url, duration_seconds=3600)
    finally:
        await runner.cleanup()
    assert epoch(response.body.credentials.expiration) == FIXED_NOW + 5
    issued = next(iter(short.issued.values()))
    assert issued.expires_at == FIXED_NOW + 5


async def test_role_with_long_max_duration_accepts_twelve_hours(base_url: str) -> None:
    """A role configured with MaxSessionDuration 43200 may be assumed for 12 hours."""
    response = await assume_role(base_url, role_arn=LONG_ROLE_ARN, duration_seconds=43200)

    assert epoch(response.body.credentials.expiration) == FIXED_NOW + 43200


async def test_wrong_secret_is_signature_does_not_match(
    emulator: StsEmulator, base_url: str
) -> None:
    """A request signed with the wrong secret fails with 400 SignatureDoesNotMatch."""
    client = sdk_client(base_url, access_key_secret="not-the-secret")

    with pytest.raises(ClientException) as caught:
        await client.assume_role_async(assume_role_request())

    assert (caught.value.status_code, caught.value.code) == (400, "SignatureDoesNotMatch")
    assert emulator.issued == {}
    assert emulator.calls[0].outcome == "SignatureDoesNotMatch"


async def test_unknown_access_key_is_not_found(emulator: StsEmulator, base_url: str) -> None:
    """An access key id the emulator does not know fails with 404 InvalidAccessKeyId.NotFound."""
    client = sdk_client(base_url, access_key_id="LTAI-unknown")

    with pytest.raises(ClientException) as caught:
        await client.assume_role_async(assume_role_request())

    assert (caught.value.status_code, caught.value.code) == (404, "InvalidAccessKeyId.NotFound")
    assert emulator.calls[0].access_key_id == "LTAI-unknown"


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        ({"duration_seconds": 899}, 400, "InvalidParameter.DurationSeconds"),
        ({"duration_seconds": 43201}, 400, "InvalidParameter.DurationSeconds"),
        ({"duration_seconds": 3601}, 400, "InvalidParameter.DurationSeconds"),
        ({"policy": POLICY + " " * 2048}, 400, "InvalidParameter.PolicySize"),
        ({"policy": "{not json"}, 400, "InvalidParameter.PolicyGrammar"),
        ({"policy": '{"Statement": []}'}, 400, "InvalidParameter.PolicyGrammar"),
        ({"role_session_name": "a"}, 400, "InvalidParameter.RoleSessionName"),
        ({"role_session_name": "bad name!"}, 400, "InvalidParameter.RoleSessionName"),
        ({"role_session_name": "x" * 65}, 400, "InvalidParameter.RoleSessionName"),
        ({"role_session_name": None}, 400, "MissingRoleSessionName"),
        ({"role_arn": None}, 400, "MissingRoleArn"),
        ({"role_arn": "acs:ram::12ab:role/x"}, 400, "InvalidParameter.RoleArn"),
        ({"role_arn": "acs:ram::999:role/x"}, 404, "EntityNotExist.Role"),
        ({"external_id": "x"}, 400, "InvalidParameter.ExternalId"),
    ],
    ids=[
        "duration-below-900",
        "duration-above-43200",
        "duration-above-role-max",
        "policy-too-long",
        "policy-not-json",
        "policy-without-version",
        "session-name-too-short",
        "session-name-bad-chars",
        "session-name-too-long",
        "session-name-missing",
        "role-arn-missing",
        "role-arn-malformed",
        "role-in-other-account",
        "external-id-too-short",
    ],
)
async def test_invalid_parameters_get_sts_error_codes(
    emulator: StsEmulator, base_url: str, overrides: dict[str, Any], status: int, code: str
) -> None:
    """Out-of-limit AssumeRole parameters are refused with STS's own codes and statuses."""
    with pytest.raises(ClientException) as caught:
        await assume_role(base_url, **overrides)

    assert (caught.value.status_code, caught.value.code) == (status, code)
    assert emulator.issued == {}
    assert [call.outcome for call in emulator.calls] == [code]


async def test_error_body_has_the_gateway_shape(base_url: str) -> None:
    """Error replies are JSON with RequestId, HostId, Code, Message and Recommend."""
    url, headers = signed_raw_request(base_url)
    headers["Authorization"] = "ACS3-HMAC-SHA256 garbled"

    status, body = await post_raw(url, headers)

    assert status == 400
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    assert body["Code"] == "IncompleteSignature"


async def test_reused_nonce_is_refused(emulator: StsEmulator, base_url: str) -> None:
    """Replaying a request with a used x-acs-signature-nonce fails with SignatureNonceUsed."""
    url, headers = signed_raw_request(base_url)

    first_status, _ = await post_raw(url, headers)
    second_status, second = await post_raw(url, headers)

    assert first_status == 200
    assert (second_status, second["Code"]) == (400, "SignatureNonceUsed")
    assert emulator.assume_role_calls() == 1


async def test_stale_date_is_refused(base_url: str) -> None:
    """An x-acs-date past the skew (real clock) fails with InvalidTimeStamp.Expired."""
    stale = datetime.fromtimestamp(time.time() - 1200, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    url, headers = signed_raw_request(base_url, date=stale)

    status, body = await post_raw(url, headers)

    assert (status, body["Code"]) == (400, "InvalidTimeStamp.Expired")


async def test_body_not_matching_content_hash_fails_signature(base_url: str) -> None:
    """A body whose sha256 differs from the signed x-acs-content-sha256 fails the signature."""
    url, headers = signed_raw_request(base_url, body=b"")

    status, body = await post_raw(url, headers, body=b"RoleSessionName=mallory")

    assert (status, body["Code"]) == (400, "SignatureDoesNotMatch")


@pytest.mark.parametrize(
    ("faults", "exception", "status", "code"),
    [
        ({"throttle": True}, ClientException, 400, "Throttling.Api"),
        (
            {"throttle": True, "throttle_code": "Throttling.User"},
            ClientException,
            400,
            "Throttling.User",
        ),
        ({"error_status": 500}, ServerException, 500, "InternalError"),
        ({"error_status": 503}, ServerException, 503, "ServiceUnavailable"),
    ],
    ids=["throttle", "throttle-user", "internal-error", "service-unavailable"],
)
async def test_error_faults_answer_like_sts(
    emulator: StsEmulator,
    base_url: str,
    faults: dict[str, Any],
    exception: type[Exception],
    status: int,
    code: str,
) -> None:
    """Throttling and 5xx faults reach the SDK as STS error replies with the real codes."""
    emulator.faults.update(faults)

    with pytest.raises(exception) as caught:
        await assume_role(base_url)

    assert (getattr(caught.value, "status_code", None), getattr(caught.value, "code", None)) == (
        status,
        code,
    )
    assert emulator.calls[0].outcome.startswith("fault:")
    assert emulator.issued == {}


@pytest.mark.parametrize("fault", ["reset_connection", "malformed_body"])
async def test_transport_faults_make_the_sdk_fail(
    emulator: StsEmulator, base_url: str, fault: str
) -> None:
    """A dropped connection or a non-JSON 200 makes the SDK raise without credentials."""
    emulator.faults.update({fault: True})

    with pytest.raises(UnretryableException):
        await assume_role(base_url)

    assert [call.outcome for call in emulator.calls] == [f"fault:{fault}"]


async def test_omit_credentials_fault_returns_no_credentials(
    emulator: StsEmulator, base_url: str
) -> None:
    """omit_credentials answers 200 JSON without a Credentials object."""
    emulator.faults.omit_credentials = True

    response = await assume_role(base_url)

    assert response.status_code == 200
    assert response.body.credentials is None
    assert emulator.issued == {}


async def test_omit_expiration_fault_returns_credentials_without_expiration(
    emulator: StsEmulator, base_url: str
) -> None:
    """omit_expiration answers credentials with no Expiration field."""
    emulator.faults.omit_expiration = True

    response = await assume_role(base_url)

    assert response.body.credentials.access_key_id.startswith("STS.")
    assert response.body.credentials.expiration is None


async def test_expired_credentials_fault_returns_past_expiration(
    emulator: StsEmulator, base_url: str
) -> None:
    """expired_credentials answers credentials whose Expiration is already past."""
    emulator.faults.expired_credentials = True

    response = await assume_role(base_url)

    credentials = response.body.credentials
    assert epoch(credentials.expiration) < FIXED_NOW
    assert emulator.issued[credentials.access_key_id].expires_at < FIXED_NOW


async def test_delay_fault_delays_the_answer(emulator: StsEmulator, base_url: str) -> None:
    """delay_seconds holds the answer back, then answers normally."""
    emulator.faults.delay_seconds = 0.3
    started = time.monotonic()

    response = await assume_role(base_url)

    assert time.monotonic() - started >= 0.3
    assert response.status_code == 200


async def test_delay_beyond_read_timeout_times_the_sdk_out(
    emulator: StsEmulator, base_url: str
) -> None:
    """A delay longer than the SDK's read timeout makes the call fail."""
    emulator.faults.delay_seconds = 0.6
    client = sdk_client(base_url, read_timeout_ms=100)

    with pytest.raises(UnretryableException):
        await client.assume_role_async(assume_role_request())


async def test_remaining_clears_faults_after_that_many_requests(
    emulator: StsEmulator, base_url: str
) -> None:
    """With remaining=2 the faults hit two requests, then clear themselves."""
    emulator.faults.update({"throttle": True, "remaining": 2})

    for _ in range(2):
        with pytest.raises(ClientException):
            await assume_role(base_url)
    response = await assume_role(base_url)

    assert response.status_code == 200
    assert not emulator.faults.active()
    assert [call.outcome for call in emulator.calls] == ["fault:throttle"] * 2 + ["issued"]


async def test_http_control_sets_faults_and_reports_calls(
    emulator: StsEmulator, base_url: str
) -> None:
    """POST /__emulator__/faults switches faults; GET /__emulator__/calls counts calls."""
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"{base_url}/__emulator__/faults", json={"throttle": True, "remaining": 1}
        ) as reply:
            assert reply.status == 200
        with pytest.raises(ClientException):
            await assume_role(base_url)
        await assume_role(base_url)
        async with session.get(f"{base_url}/__emulator__/calls") as reply:
            counts = await reply.json()
        async with session.post(f"{base_url}/__emulator__/faults", json={"nope": 1}) as reply:
            rejected = reply.status

    assert counts == {
        "received": 2,
        "calls": 2,
        "issued": 1,
        "outcomes": ["fault:throttle", "issued"],
    }
    assert rejected == 400
    assert not emulator.faults.active()


async def _post_faults(base_url: str, changes: Any) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base_url}/__emulator__/faults", json=changes) as reply,
    ):
        return reply.status, await reply.json()


async def test_a_scripted_sequence_plays_one_outcome_per_request(
    emulator: StsEmulator, base_url: str
) -> None:
    """sequence (set over HTTP) answers each request with the next outcome, then normally."""
    status, _ = await _post_faults(
        base_url, {"sequence": ["throttle:Throttling.Tenant", "error:503", "ok", "error:500"]}
    )
    assert status == 200
    with pytest.raises(ClientException) as throttled:
        await assume_role(base_url)
    with pytest.raises(ServerException) as unavailable:
        await assume_role(base_url)
    await assume_role(base_url)
    with pytest.raises(ServerException) as internal:
        await assume_role(base_url)
    await assume_role(base_url)
    assert (throttled.value.status_code, throttled.value.code) == (400, "Throttling.Tenant")
    assert (unavailable.value.status_code, unavailable.value.code) == (503, "ServiceUnavailable")
    assert (internal.value.status_code, internal.value.code) == (500, "InternalError")
    assert [call.outcome for call in emulator.calls] == [
        "fault:throttle:Throttling.Tenant",
        "fault:error:503",
        "issued",
        "fault:error:500",
        "issued",
    ]


async def test_every_nth_request_fails(emulator: StsEmulator, base_url: str) -> None:
    """every_nth=2 fails the 2nd, 4th, 6th... request after it was set, with nth_outcome."""
    emulator.faults.update({"every_nth": 2, "nth_outcome": "error:500"})
    outcomes = []
    for _ in range(6):
        try:
            await assume_role(base_url)
            outcomes.append("ok")
        except ServerException:
            outcomes.append("500")
    assert outcomes == ["ok", "500"] * 3


@pytest.mark.parametrize("status", [502, 504, 403])
async def test_html_error_pages_come_with_their_status(base_url: str, status: int) -> None:
    """html:STATUS answers a proxy's text/html error page with that status."""
    emulator_faults = {"always": f"html:{status}"}
    await _post_faults(base_url, emulator_faults)
    url, headers = signed_raw_request(base_url)
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers) as reply:
        text = await reply.text()
        assert (reply.status, reply.content_type) == (status, "text/html")
    assert f"<h1>{status} " in text


async def test_a_truncated_body_breaks_off_mid_reply(base_url: str) -> None:
    """truncated sends a 200 whose body stops short of its Content-Length."""
    await _post_faults(base_url, {"always": "truncated"})
    url, headers = signed_raw_request(base_url)
    async with aiohttp.ClientSession() as session, session.post(url, headers=headers) as reply:
        assert reply.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await reply.read()


@pytest.mark.parametrize("outcome", ["truncated", "garbage", "html:502", "reset"])
async def test_broken_replies_make_the_sdk_fail(
    emulator: StsEmulator, base_url: str, outcome: str
) -> None:
    """Truncated, garbage, HTML or reset: the SDK gets no usable answer and raises."""
    emulator.faults.update({"always": outcome})
    with pytest.raises(UnretryableException):
        await assume_role(base_url)
    assert emulator.issued == {}


@pytest.mark.parametrize(
    ("outcome", "expiration"),
    [
        ("expiration:far_future", "9999-12-31T23:59:59Z"),
        ("expiration:unparseable", "Wed, 02 Dec 2026 07:19:58 GMT"),
        ("expiration:missing", None),
    ],
)
async def test_expiration_faults_spoil_only_the_reply(
    emulator: StsEmulator, base_url: str, outcome: str, expiration: str | None
) -> None:
    """The reply's Expiration is spoiled; the token itself is real and expires as issued."""
    emulator.faults.update({"always": outcome})
    credentials = (await assume_role(base_url)).body.credentials
    assert credentials.expiration == expiration
    assert emulator.issued[credentials.access_key_id].expires_at == FIXED_NOW + 900


async def test_clock_skew_moves_expiration_and_the_date_check(
    emulator: StsEmulator, base_url: str
) -> None:
    """clock_skew_seconds: Expiration from STS's own clock; x-acs-date judged by it too."""
    emulator.faults.update({"clock_skew_seconds": 600})
    response = await assume_role(base_url)
    assert epoch(response.body.credentials.expiration) == FIXED_NOW + 600 + 900
    emulator.faults.update({"clock_skew_seconds": -1000})
    with pytest.raises(ClientException) as caught:
        await assume_role(base_url)
    assert caught.value.code == "InvalidTimeStamp.Expired"


async def test_issued_lifetime_overrides_duration() -> None:
    """issued_lifetime_seconds sets Expiration = now + it, longer or shorter than asked."""
    for lifetime in (120, 7200):
        emulator = StsEmulator(
            access_keys={ACCESS_KEY_ID: ACCESS_KEY_SECRET},
            clock=lambda: FIXED_NOW,
            issued_lifetime_seconds=lifetime,
        )
        runner, url = await start_sts_emulator(emulator)
        try:
            response = await assume_role(url, duration_seconds=900)
        finally:
            await runner.cleanup()
        assert epoch(response.body.credentials.expiration) == FIXED_NOW + lifetime


async def test_each_sdk_call_is_signed_with_a_new_nonce_and_date(
    emulator: StsEmulator, base_url: str
) -> None:
    """Repeated SDK calls (as retries are) carry distinct nonces; none is refused as replayed."""
    emulator.faults.update({"sequence": ["error:500", "throttle", "error:503"]})
    for _ in range(3):
        with pytest.raises(Exception):  # noqa: B017, PT011 - the faults themselves
            await assume_role(base_url)
    await assume_role(base_url)
    nonces = [call.nonce for call in emulator.calls]
    assert len(set(nonces)) == 4
    assert all(call.date for call in emulator.calls)
    assert "SignatureNonceUsed" not in [call.outcome for call in emulator.calls]


@pytest.mark.parametrize(
    "changes",
    [
        {"sequence": ["error:200"]},
        {"sequence": "error:500"},
        {"always": "explode"},
        {"nth_outcome": "delay:forever"},
        {"every_nth": 0},
        {"clock_skew_seconds": "600"},
        {"throttle_code": "InternalError"},
        {"expiration": "past"},
    ],
)
async def test_bad_fault_scripts_are_refused(base_url: str, changes: dict[str, Any]) -> None:
    """An unknown outcome, field or badly typed value is a 400 naming it; nothing changes."""
    status, body = await _post_faults(base_url, changes)
    assert status == 400
    assert next(iter(changes)) in body["error"]
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"{base_url}/__emulator__/faults") as reply,
    ):
        current = await reply.json()
    assert current["sequence"] == []
    assert current["always"] is None


async def test_remaining_switches_off_persistent_faults_only(emulator: StsEmulator) -> None:
    """remaining counts persistent faults down; a sequence and every_nth are left alone."""
    emulator.faults.update(
        {"always": "error:503", "remaining": 1, "sequence": ["ok"], "every_nth": 3}
    )
    assert emulator.faults.take().outcome is None  # the sequence's "ok" wins, remaining spent
    assert emulator.faults.take().outcome is None
    third = emulator.faults.take().outcome
    assert third is not None
    assert third.label == "error:500"
    assert emulator.faults.always is None
    assert emulator.faults.every_nth == 3


# --- AssumeRoleWithOIDC -------------------------------------------------------------------


@pytest.fixture
def idp() -> IdentityProvider:
    return identity_provider()


@pytest.fixture
async def oidc_url(idp: IdentityProvider) -> AsyncIterator[tuple[StsEmulator, str]]:
    emulator = StsEmulator(
        access_keys={ACCESS_KEY_ID: ACCESS_KEY_SECRET},
        clock=lambda: FIXED_NOW,
        oidc_providers={PROVIDER_ARN: idp.provider(roles=(ROLE_ARN,))},
    )
    runner, url = await start_sts_emulator(emulator)
    yield emulator, url
    await runner.cleanup()


def anonymous_client(base_url: str) -> StsSdkClient:
    """An SDK client with no AccessKey at all: AssumeRoleWithOIDC is an anonymous call."""
    config = Config(
        endpoint=base_url.removeprefix("http://"), protocol="http", region_id="cn-hangzhou"
    )
    return StsSdkClient(config)


async def assume_role_with_oidc(
    base_url: str, token: str, **overrides: Any
) -> sts_models.AssumeRoleWithOIDCResponse:
    values: dict[str, Any] = {
        "oidcprovider_arn": PROVIDER_ARN,
        "oidctoken": token,
        "role_arn": ROLE_ARN,
        "role_session_name": "u.alice",
        "duration_seconds": 900,
        "policy": POLICY,
    }
    values.update(overrides)
    request = sts_models.AssumeRoleWithOIDCRequest(**values)
    return await anonymous_client(base_url).assume_role_with_oidcwith_options_async(
        request, RuntimeOptions()
    )


async def test_assume_role_with_oidc_issues_credentials_for_a_good_token(
    oidc_url: tuple[StsEmulator, str], idp: IdentityProvider
) -> None:
    """A valid token via the official SDK gets credentials and OIDCTokenInfo; Policy is kept."""
    emulator, url = oidc_url
    response = await assume_role_with_oidc(url, idp.token(FIXED_NOW))
    body = response.body
    assert body is not None
    assert body.credentials is not None
    assert body.oidctoken_info is not None
    assert body.oidctoken_info.subject == "alice"
    assert body.oidctoken_info.issuer == idp.issuer
    issued = emulator.issued[body.credentials.access_key_id]
    assert issued.policy == POLICY
    assert issued.role_session_name == "u.alice"
    assert epoch(body.credentials.expiration) == FIXED_NOW + 900
    call = emulator.calls[-1]
    assert call.outcome == "issued"
    assert call.access_key_id == ""  # anonymous: no AccessKey was presented
    assert call.params["Action"] == "AssumeRoleWithOIDC"
    assert call.params["Policy"] == POLICY
    assert call.params["OIDCToken"] == "<redacted>"  # the bearer token is never kept


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"exp": int(FIXED_NOW) - 1}, "AuthenticationFail.OIDCToken.Expired"),
        ({"aud": "someone-else"}, "AuthenticationFail.OIDCToken.AudienceNotMatch"),
        ({"iss": "https://evil.example.test"}, "AuthenticationFail.OIDCToken.IssuerNotMatch"),
        ({"sub": None}, "AuthenticationFail.OIDCToken.Invalid"),
    ],
)
async def test_bad_oidc_token_claims_get_sts_error_codes(
    oidc_url: tuple[StsEmulator, str], idp: IdentityProvider, change: dict[str, Any], code: str
) -> None:
    """Expired, wrong audience or issuer, no subject: STS's code, nothing issued."""
    emulator, url = oidc_url
    with pytest.raises(ClientException) as caught:
        await assume_role_with_oidc(url, idp.token(FIXED_NOW, **change))
    assert caught.value.code == code
    assert caught.value.status_code == 401
    assert emulator.issued == {}


async def test_token_signed_by_an_unpublished_key_is_invalid(
    oidc_url: tuple[StsEmulator, str], idp: IdentityProvider
) -> None:
    """A token signed by another key: .InvalidSignature; one that is no JWT at all: .Invalid."""
    _, url = oidc_url
    cases = [
        (idp.token(FIXED_NOW, key=other_key()), "AuthenticationFail.OIDCToken.InvalidSignature"),
        ("not-a-jwt", "AuthenticationFail.OIDCToken.Invalid"),
    ]
    for token, code in cases:
        with pytest.raises(ClientException) as caught:
            await assume_role_with_oidc(url, token)
        assert (caught.value.status_code, caught.value.code) == (401, code)


@pytest.mark.parametrize(
    ("overrides", "status", "code"),
    [
        (
            {"oidcprovider_arn": "acs:ram::1234567890123456:oidc-provider/nope"},
            401,
            "AuthenticationFail.NoPermission",
        ),
        ({"oidcprovider_arn": "arn:aws:iam::1:oidc"}, 400, "InvalidParameter.OIDCProviderArn"),
        ({"oidcprovider_arn": None}, 400, "MissingOIDCProviderArn"),
        ({"role_arn": LONG_ROLE_ARN}, 401, "AuthenticationFail.NoPermission"),
        ({"duration_seconds": 60}, 400, "InvalidParameter.DurationSeconds"),
    ],
)
async def test_bad_oidc_request_parameters_get_sts_error_codes(
    oidc_url: tuple[StsEmulator, str],
    idp: IdentityProvider,
    overrides: dict[str, Any],
    status: int,
    code: str,
) -> None:
    """Unknown or malformed provider, a role that does not trust it, STS's limits: STS's codes."""
    _, url = oidc_url
    with pytest.raises(ClientException) as caught:
        await assume_role_with_oidc(url, idp.token(FIXED_NOW), **overrides)
    assert (caught.value.status_code, caught.value.code) == (status, code)


async def test_missing_oidc_token_is_refused(oidc_url: tuple[StsEmulator, str]) -> None:
    """No OIDCToken at all: MissingOIDCToken."""
    _, url = oidc_url
    with pytest.raises(ClientException) as caught:
        await assume_role_with_oidc(url, "", oidctoken=None)
    assert caught.value.code == "MissingOIDCToken"
