"""GET /v1/credentials/{policy} through a real socket, against the STS emulator."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, get_args

import pytest

from broker.auth import hash_api_key
from broker.config import ApiRoute
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
    assert body["Oss"] == {
        "Bucket": "examplebucket",
        "Region": "cn-hangzhou",
        "Endpoint": "https://oss-cn-hangzhou.aliyuncs.com",
        "Prefix": "avatars/alice/",
        "AddressStyle": "virtual",
    }
    assert not {"Bucket", "Region", "Endpoint", "Prefix"} & body.keys()


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
            return str((await resp.json())["Oss"]["Prefix"])

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
    assert body["Oss"]["Prefix"] == "avatars/alice/"


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
    assert recovered["Oss"]["Prefix"] == "avatars/alice/"


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


# Every option name ali-oss 6.23.0 reads from its client options (``this.options``):
# the constructor options of its README ("oss(options)"), the defaults of
# lib/common/client/initOptions.js, and each ``this.options.NAME`` / ``options.NAME``
# read in lib/client.js, lib/browser/client.js and lib/common/**.  ``refreshSTSToken``'s
# result is first-letter-lower-cased (lib/common/utils/formatObjKey.js), ``securityToken``
# is copied to ``stsToken``, and every key is ``Object.assign``-ed into these options
# (lib/common/utils/setSTSToken.js).  tests/clients drives ali-oss itself with the reply.
ALI_OSS_OPTIONS = frozenset(
    {
        # README "oss(options)"
        *("accessKeyId", "accessKeySecret", "stsToken", "refreshSTSToken"),
        *("refreshSTSTokenInterval", "bucket", "endpoint", "region", "internal", "secure"),
        *("timeout", "cname", "isRequestPay", "useFetch", "enableProxy", "proxy", "retryMax"),
        *("maxSockets", "authorizationV4", "cloudBoxId"),
        # lib/common/client/initOptions.js defaults
        *("sldEnable", "headerEncoding", "inited"),
        # read from this.options / options in lib/
        *("urllib", "amendTimeSkewed", "cancelFlag", "agent", "httpsAgent"),
        *("requestErrorRetryHandle", "imageHost", "ctx", "cluster", "headers"),
        *("heartbeatInterval", "ignoreStatusFile", "masterOnly", "schedule"),
    }
)


def _as_ali_oss_merges_it(reply: dict[str, Any]) -> set[str]:
    """The option names ali-oss's setSTSToken assigns from ``reply``."""
    keys = {key[:1].lower() + key[1:] for key in reply}
    return keys | {"stsToken"} if "securityToken" in keys else keys


async def test_reply_is_safe_to_return_from_ali_oss_refresh_sts_token(
    broker: BrokerHarness,
) -> None:
    """Merged into ali-oss's options, the reply sets its credentials and no other option."""
    status, body = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert status == 200
    merged = _as_ali_oss_merges_it(body)
    assert merged & ALI_OSS_OPTIONS == {"accessKeyId", "accessKeySecret", "stsToken"}
    assert "oss" in merged  # the location travels nested, where no option is named


async def test_endpoint_is_a_https_url_in_production(make_broker: BrokerFactory) -> None:
    """With no oss override, Endpoint is the policy's endpoint as an https:// URL."""
    broker = await make_broker()
    _, body = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert body["Oss"]["Endpoint"] == "https://oss-cn-hangzhou.aliyuncs.com"
    assert body["Oss"]["AddressStyle"] == "virtual"
    _, listed = await broker.get_json("/v1/policies", caller="svc-a")
    (entry,) = [p for p in listed["policies"] if p["name"] == "service-uploads"]
    assert (entry["endpoint"], entry["address_style"]) == (
        "https://oss-cn-hangzhou.aliyuncs.com",
        "virtual",
    )


@pytest.mark.parametrize(
    ("oss", "endpoint", "style"),
    [
        (
            {"endpoint": "http://127.0.0.1:9100", "addressing": "path"},
            "http://127.0.0.1:9100",
            "path",
        ),
        # An IP-address host is always path-style, as in the SDKs (endpoints.is_ip).
        ({"endpoint": "http://127.0.0.1:9100"}, "http://127.0.0.1:9100", "path"),
        (
            {"endpoint": "cdn.example.com", "addressing": "cname"},
            "https://cdn.example.com",
            "cname",
        ),
    ],
)
async def test_endpoint_keeps_its_scheme_and_addressing(
    make_broker: BrokerFactory, oss: dict[str, str], endpoint: str, style: str
) -> None:
    """Dev-mode-like (http, emulator) and CDN endpoints come out as URLs with their style."""
    broker = await make_broker(oss=oss)
    _, body = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert (body["Oss"]["Endpoint"], body["Oss"]["AddressStyle"]) == (endpoint, style)


async def test_bare_policy_endpoint_becomes_https_url(
    make_broker: BrokerFactory, tmp_path: Path
) -> None:
    """A policy's bare endpoint host is handed out as https://host."""
    source = (POLICIES_DIR / "service-uploads.yaml").read_text()
    (tmp_path / "p.yaml").write_text(source + "endpoint: oss-cn-hangzhou-internal.aliyuncs.com\n")
    broker = await make_broker(policies_dir=tmp_path)
    _, body = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert body["Oss"]["Endpoint"] == "https://oss-cn-hangzhou-internal.aliyuncs.com"


PROVIDER_KEY = "canary-apikey-provider-0c4d"


async def _restricted_broker(make_broker: BrokerFactory, allow: dict[str, Any]) -> BrokerHarness:
    keys = [
        {"id": caller, "key_sha256": hash_api_key(key), "groups": list(groups)}
        for caller, (key, groups) in CALLERS.items()
    ]
    restricted = {"id": "svc-provider", "key_sha256": hash_api_key(PROVIDER_KEY)}
    keys.append({**restricted, "groups": ["internal"], "allow": allow})
    return await make_broker(auth={"api_keys": keys})


async def _as_provider(
    broker: BrokerHarness, method: str, path: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {PROVIDER_KEY}"}
    async with broker.client.request(method, path, headers=headers, json=body) as resp:
        return resp.status, await resp.json()


CREDENTIALS_ONLY = {"routes": ["credentials"], "policies": ["service-uploads"]}


async def test_restricted_key_fetches_its_policy(make_broker: BrokerFactory) -> None:
    """A key allowed credentials for service-uploads gets them (also via ?access_token=)."""
    broker = await _restricted_broker(make_broker, CREDENTIALS_ONLY)
    status, body = await _as_provider(broker, "GET", "/v1/credentials/service-uploads")
    assert (status, body["Oss"]["Prefix"]) == (200, "services/svc-provider/")
    path = f"/v1/credentials/service-uploads?access_token={PROVIDER_KEY}"
    status, _ = await broker.get_json(path, caller=None)
    assert status == 200


async def test_restricted_key_is_refused_other_policies(make_broker: BrokerFactory) -> None:
    """The key's groups allow reports-read, but its allow.policies does not: 403, no STS call."""
    broker = await _restricted_broker(make_broker, CREDENTIALS_ONLY)
    status, body = await _as_provider(broker, "GET", "/v1/credentials/reports-read")
    assert (status, body["error"]["code"], body["ErrorCode"]) == (
        403,
        "AccessDenied",
        "AccessDenied",
    )
    assert body["error"]["message"] == (
        "this API key may only be used for the policies: service-uploads"
    )
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/v1/presign", {"policy": "service-uploads", "key": "services/svc-provider/x"}),
        ("POST", "/v1/post-policy", {"policy": "service-uploads"}),
        ("GET", "/v1/policies", None),
    ],
)
async def test_restricted_key_is_refused_other_routes(
    make_broker: BrokerFactory, method: str, path: str, body: dict[str, Any] | None
) -> None:
    """A credentials-only key gets 403 AccessDenied on every other route, naming what it may do."""
    broker = await _restricted_broker(make_broker, CREDENTIALS_ONLY)
    status, reply = await _as_provider(broker, method, path, body)
    assert (status, reply["error"]["code"]) == (403, "AccessDenied")
    assert reply["error"]["message"] == (
        "this API key may only be used for GET /v1/credentials/{policy}"
    )
    assert broker.sts.emulator.calls == []


async def test_policy_restricted_key_sees_and_signs_only_its_policies(
    make_broker: BrokerFactory,
) -> None:
    """A key restricted by policy only lists and presigns for those policies, every route open."""
    broker = await _restricted_broker(make_broker, {"policies": ["service-uploads"]})
    status, listed = await _as_provider(broker, "GET", "/v1/policies")
    assert status == 200
    assert [entry["name"] for entry in listed["policies"]] == ["service-uploads"]
    presign = {"policy": "service-uploads", "key": "services/svc-provider/x", "method": "PUT"}
    presign["content_length"] = 1  # service-uploads limits object sizes
    status, _ = await _as_provider(broker, "POST", "/v1/presign", presign)
    assert status == 200
    status, _ = await _as_provider(
        broker, "POST", "/v1/presign", {**presign, "policy": "reports-read"}
    )
    assert status == 403


def test_allow_routes_name_every_api_route(broker: BrokerHarness) -> None:
    """allow.routes' vocabulary is exactly the names of app.py's /v1 routes."""
    app_routes = {
        route.name
        for route in broker.client.app.router.routes()
        if route.resource is not None and route.resource.canonical.startswith("/v1/")
    }
    assert set(get_args(ApiRoute)) == app_routes
