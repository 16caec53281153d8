"""GET /v1/credentials/{policy} through a real socket, against the STS emulator."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from broker.auth import hash_api_key
from tests.conftest import CALLERS, POLICIES_DIR, BrokerFactory, BrokerHarness

EXPECTED_ALICE_AVATAR_POLICY = (
    '{"Version":"1","Statement":[{"Effect":"Allow","Action":["oss:PutObject"],'
    '"Resource":["acs:oss:*:*:examplebucket/avatars/alice/*"]}]}'
)


async def test_body_matches_all_three_client_formats(broker: BrokerHarness) -> None:
    """The reply carries the STS, credentials-URI and mobile auth-server fields at once."""
    status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200
    issued = broker.sts.emulator.issued[body["AccessKeyId"]]
    assert body["Code"] == "Success"
    assert body["StatusCode"] == 200
    assert body["AccessKeySecret"] == issued.access_key_secret
    assert body["SecurityToken"] == issued.security_token
    assert body["Credentials"] == {
        "AccessKeyId": issued.access_key_id,
        "AccessKeySecret": issued.access_key_secret,
        "SecurityToken": issued.security_token,
        "Expiration": body["Expiration"],
    }
    expiration = datetime.strptime(body["Expiration"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert expiration.timestamp() == issued.expires_at
    assert body["ExpiresIn"] == 900
    assert body["Bucket"] == "examplebucket"
    assert body["Region"] == "cn-hangzhou"
    assert body["Endpoint"] == "oss-cn-hangzhou.aliyuncs.com"
    assert body["Prefix"] == "avatars/alice/"


async def test_policy_sent_to_sts_is_exactly_the_expected_document(broker: BrokerHarness) -> None:
    """STS receives the minified inline policy for alice, her session name and the duration."""
    status, _ = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200
    (call,) = broker.sts.emulator.calls
    assert call.params["Policy"] == EXPECTED_ALICE_AVATAR_POLICY
    assert call.params["RoleArn"] == "acs:ram::1234567890123456:role/oss-avatar-upload"
    assert call.params["RoleSessionName"] == "alice"
    assert call.params["DurationSeconds"] == "900"


async def test_every_sts_call_carries_a_policy(broker: BrokerHarness) -> None:
    """No AssumeRole reaches STS without a Policy, for every example policy."""
    for policy, caller in [
        ("avatar-upload", "alice"),
        ("service-uploads", "svc-a"),
        ("reports-read", "svc-reports"),
    ]:
        status, _ = await broker.get_json(f"/v1/credentials/{policy}", caller=caller)
        assert status == 200
    assert len(broker.sts.emulator.calls) == 3
    assert all(json.loads(call.params["Policy"])["Statement"] for call in broker.sts.emulator.calls)


async def test_thousand_concurrent_cold_requests_one_sts_call(broker: BrokerHarness) -> None:
    """1,000 concurrent cold HTTP requests for one scope make exactly one AssumeRole."""
    broker.sts.emulator.faults.delay_seconds = 0.05

    async def fetch() -> str:
        status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
        assert status == 200
        return str(body["AccessKeyId"])

    ids = await asyncio.gather(*(fetch() for _ in range(1000)))
    assert broker.sts.emulator.assume_role_calls() == 1
    assert len(set(ids)) == 1


async def test_fifty_subjects_fifty_sts_calls(make_broker: BrokerFactory) -> None:
    """50 distinct subjects, each asking 5 times concurrently, make exactly 50 AssumeRole calls."""
    keys = {f"user{index:02d}": f"canary-apikey-user-{index:02d}" for index in range(50)}
    api_keys = [
        {"id": caller, "key_sha256": hash_api_key(key), "groups": ["browser"]}
        for caller, key in keys.items()
    ]
    broker = await make_broker(auth={"api_keys": api_keys})

    async def fetch(key: str) -> str:
        headers = {"Authorization": f"Bearer {key}"}
        async with broker.client.get("/v1/credentials/avatar-upload", headers=headers) as resp:
            assert resp.status == 200
            return str((await resp.json())["Prefix"])

    prefixes = await asyncio.gather(*(fetch(key) for key in keys.values() for _ in range(5)))
    assert broker.sts.emulator.assume_role_calls() == 50
    assert set(prefixes) == {f"avatars/{caller}/" for caller in keys}


async def test_cached_reply_until_margin(broker: BrokerHarness) -> None:
    """Repeated requests are served from cache; ExpiresIn counts down with the clock."""
    _, first = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    broker.clock.advance(100)
    _, second = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert second["AccessKeyId"] == first["AccessKeyId"]
    assert second["ExpiresIn"] == 800
    assert broker.sts.emulator.assume_role_calls() == 1


async def test_min_ttl_seconds(broker: BrokerHarness) -> None:
    """min_ttl_seconds forces a fresh token when the cached one has less; bad values are 400."""
    _, first = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    broker.clock.advance(300)
    path = "/v1/credentials/avatar-upload?min_ttl_seconds="
    _, same = await broker.get_json(path + "600", caller="alice")
    assert same["AccessKeyId"] == first["AccessKeyId"]
    _, fresh = await broker.get_json(path + "700", caller="alice")
    assert fresh["AccessKeyId"] != first["AccessKeyId"]
    assert fresh["ExpiresIn"] == 900
    for bad in ["-1", "abc", "841", "1e3", "", "600&min_ttl_seconds=1"]:
        status, body = await broker.get_json(path + bad, caller="alice")
        assert status == 400, bad
        assert body["error"]["code"] == "RequestInvalid"


async def test_same_403_for_forbidden_and_missing_policies(broker: BrokerHarness) -> None:
    """A caller gets an identical 403 for a policy it may not use and one that does not exist."""
    status_a, forbidden = await broker.get_json("/v1/credentials/avatar-upload", caller="svc-a")
    status_b, missing = await broker.get_json("/v1/credentials/no-such-policy", caller="svc-a")
    assert status_a == status_b == 403

    def normalised(body: dict[str, Any], name: str) -> str:
        body["error"]["request_id"] = "-"
        return json.dumps(body, sort_keys=True).replace(name, "NAME")

    assert normalised(forbidden, "avatar-upload") == normalised(missing, "no-such-policy")
    assert forbidden["error"]["code"] == forbidden["ErrorCode"] == "AccessDenied"
    assert forbidden["StatusCode"] == 403
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("headers", "query", "status", "code"),
    [
        ({}, "", 401, "AuthenticationFailed"),
        ({"Authorization": "Bearer not-a-key"}, "", 401, "AuthenticationFailed"),
        ({"Authorization": "Basic Zm9vOmJhcg=="}, "", 401, "AuthenticationFailed"),
        ({"Authorization": "Bearer "}, "", 401, "AuthenticationFailed"),
        ({}, "?access_token=wrong", 401, "AuthenticationFailed"),
        ({"Authorization": "Bearer x"}, "?access_token=y", 400, "RequestInvalid"),
        ({}, "?access_token=a&access_token=b", 400, "RequestInvalid"),
    ],
)
async def test_authentication_failures(
    broker: BrokerHarness, headers: dict[str, str], query: str, status: int, code: str
) -> None:
    """Missing, wrong, malformed or doubled credentials get a JSON 4xx with a stable code."""
    async with broker.client.get("/v1/credentials/avatar-upload" + query, headers=headers) as resp:
        assert resp.status == status
        body = await resp.json()
    assert body["error"]["code"] == code
    assert body["ErrorCode"] == code
    assert broker.sts.emulator.calls == []


async def test_access_token_query_parameter(broker: BrokerHarness) -> None:
    """?access_token= authenticates like the header, for clients that cannot set headers."""
    key = CALLERS["alice"][0]
    status, body = await broker.get_json(
        f"/v1/credentials/avatar-upload?access_token={key}", caller=None
    )
    assert status == 200
    assert body["Prefix"] == "avatars/alice/"


@pytest.mark.parametrize(
    "name", ["..", "..%2F..%2Fetc", "UPPER", "a" * 64, "-leading", "with_underscore"]
)
async def test_malformed_policy_names(broker: BrokerHarness, name: str) -> None:
    """Policy names outside the allowed pattern get 400, never a lookup."""
    status, body = await broker.get_json(f"/v1/credentials/{name}", caller="alice")
    assert status in (400, 404)
    assert body["error"]["code"] in ("RequestInvalid", "NotFound")


async def test_caller_outside_callers_is_denied(broker: BrokerHarness) -> None:
    """A caller in none of the policy's callers gets 403 and STS is never called."""
    status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="nobody")
    assert status == 403
    assert body["error"]["code"] == "AccessDenied"
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("fault", "status", "code", "retry_after"),
    [
        ({"throttle": True}, 503, "UpstreamThrottled", True),
        ({"throttle": True, "throttle_code": "Throttling.User"}, 503, "UpstreamThrottled", True),
        ({"throttle": True, "throttle_code": "Throttling"}, 503, "UpstreamThrottled", True),
        ({"error_status": 500}, 503, "UpstreamUnavailable", True),
        ({"error_status": 503}, 503, "UpstreamUnavailable", True),
        ({"delay_seconds": 3.0}, 504, "UpstreamTimeout", True),
        ({"reset_connection": True}, 503, "UpstreamUnavailable", True),
        ({"malformed_body": True}, 503, "UpstreamUnavailable", True),
        ({"always": "error:NoPermission"}, 502, "UpstreamError", False),
        ({"omit_credentials": True}, 502, "UpstreamError", False),
        ({"omit_expiration": True}, 502, "UpstreamError", False),
        ({"expired_credentials": True}, 502, "UpstreamError", False),
    ],
)
async def test_sts_faults_map_to_gateway_errors_and_recover(
    broker: BrokerHarness, fault: dict[str, Any], status: int, code: str, retry_after: bool
) -> None:
    """Each STS failure gives its 5xx JSON error (never 500), is not cached, and recovers."""
    broker.sts.emulator.faults.update({**fault, "remaining": 1})
    async with broker.client.get(
        "/v1/credentials/avatar-upload", headers=broker.auth("alice")
    ) as resp:
        assert resp.status == status
        body = await resp.json()
        assert ("Retry-After" in resp.headers) is retry_after
    assert body["error"]["code"] == code
    assert body["ErrorCode"] == code
    assert body["StatusCode"] == status
    assert "AccessKeySecret" not in body
    assert len(broker.services.cache) == 0
    ok, recovered = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert ok == 200
    assert recovered["Prefix"] == "avatars/alice/"


async def test_wrong_source_secret_is_a_gateway_error(make_broker: BrokerFactory) -> None:
    """STS rejecting the broker's own signature gives 502, with STS's code in the message."""
    broker = await make_broker()
    broker.sts.emulator._access_keys[next(iter(broker.sts.emulator._access_keys))] = "rotated"
    status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 502
    assert "SignatureDoesNotMatch" in body["error"]["message"]


async def test_external_id_is_sent_and_keys_the_cache(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """A policy's external_id reaches STS as ExternalId."""
    source = (POLICIES_DIR / "reports-read.yaml").read_text()
    (tmp_path / "reports-read.yaml").write_text(source + "external_id: partner-42\n")
    broker = await make_broker(policies_dir=tmp_path)
    status, _ = await broker.get_json("/v1/credentials/reports-read", caller="svc-reports")
    assert status == 200
    assert broker.sts.emulator.calls[0].params["ExternalId"] == "partner-42"


async def test_oversized_header_is_refused(broker: BrokerHarness) -> None:
    """A header line over listen.max_header_bytes is refused before any handler runs."""
    headers = {**broker.auth("alice"), "X-Padding": "x" * 9000}
    async with broker.client.get("/v1/credentials/avatar-upload", headers=headers) as resp:
        assert resp.status == 400
    assert broker.sts.emulator.calls == []
