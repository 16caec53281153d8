"""GET /v1/credentials/{policy}: narrowing, several grants, short lifetimes, over a real socket."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from alibabacloud_credentials.client import Client as CredentialClient
from alibabacloud_credentials.provider import URLCredentialsProvider

from tests.conftest import CALLERS, BrokerFactory, BrokerHarness


def _statements(broker: BrokerHarness, index: int = -1) -> list[dict[str, Any]]:
    return list(json.loads(broker.sts.emulator.calls[index].params["Policy"])["Statement"])


async def test_a_narrowed_token_is_for_that_prefix_and_those_actions(broker: BrokerHarness) -> None:
    """prefix and actions narrow the Policy STS receives; the reply names the narrowed prefix."""
    path = "/v1/credentials/service-uploads?prefix=services/svc-a/run-1/&actions=put,list"
    status, body = await broker.get_json(path, caller="svc-a")
    assert status == 200
    assert body["Oss"]["Prefix"] == "services/svc-a/run-1/"
    assert [(s["Action"], s["Resource"]) for s in _statements(broker)] == [
        (["oss:PutObject"], ["acs:oss:*:*:examplebucket/services/svc-a/run-1/*"]),
        (["oss:ListObjects"], ["acs:oss:*:*:examplebucket"]),
    ]
    assert _statements(broker)[1]["Condition"] == {
        "StringLike": {"oss:Prefix": ["services/svc-a/run-1/*"]}
    }


async def test_a_key_narrowed_reply_names_the_key(broker: BrokerHarness) -> None:
    """key=... gives a token for that one object; Oss.Key says which."""
    path = "/v1/credentials/service-uploads?key=services/svc-a/out.csv"
    status, body = await broker.get_json(path, caller="svc-a")
    assert status == 200
    assert body["Oss"]["Key"] == "services/svc-a/out.csv"
    assert body["Oss"]["Prefix"] == "services/svc-a/"
    [statement] = _statements(broker)
    assert statement["Resource"] == ["acs:oss:*:*:examplebucket/services/svc-a/out.csv"]


async def test_each_narrowing_is_cached_under_its_own_key(broker: BrokerHarness) -> None:
    """The cache key follows the narrowed Policy: one STS call per distinct narrowing."""
    paths = [
        "/v1/credentials/service-uploads",
        "/v1/credentials/service-uploads?prefix=services/svc-a/run-1/",
        "/v1/credentials/service-uploads?prefix=services/svc-a/run-2/",
        "/v1/credentials/service-uploads?prefix=services/svc-a/run-1/",
        "/v1/credentials/service-uploads?actions=get",
        "/v1/credentials/service-uploads?actions=get",
    ]
    ids = []
    for path in paths:
        status, body = await broker.get_json(path, caller="svc-a")
        assert status == 200
        ids.append(body["AccessKeyId"])
    assert broker.sts.emulator.assume_role_calls() == 4
    assert ids[1] == ids[3]
    assert ids[4] == ids[5]
    assert len({ids[0], ids[1], ids[2], ids[4]}) == 4


@pytest.mark.parametrize(
    ("query", "refused"),
    [
        ("prefix=services/svc-b/", "prefix services/svc-b/ is outside this caller's scope"),
        ("prefix=services/", "prefix services/ is outside"),
        ("key=reports/a.csv", "key reports/a.csv is outside"),
        ("actions=delete", "does not grant delete"),
        ("bucket=otherbucket", "grants nothing in bucket otherbucket"),
    ],
)
async def test_asking_for_more_is_a_403_naming_what(
    broker: BrokerHarness, query: str, refused: str
) -> None:
    """Outside the caller's scope: 403 AccessDenied (mobile-SDK fields too), no STS call."""
    status, body = await broker.get_json(f"/v1/credentials/service-uploads?{query}", caller="svc-a")
    assert status == 403
    assert body["error"]["code"] == body["ErrorCode"] == "AccessDenied"
    assert refused in body["error"]["message"]
    assert body["StatusCode"] == 403
    assert broker.sts.emulator.assume_role_calls() == 0


@pytest.mark.parametrize(
    "query",
    [
        "prefix=services/svc-a",
        "prefix=services/svc-a/*/",
        "prefix=services/svc-a/%2E%2E/",
        "key=services/svc-a/a%20b",
        "prefix=services/svc-a/a/&key=services/svc-a/a/b",
        "actions=get&actions=put",
        "actions=read",
        "key=services/svc-a/x&actions=list",
    ],
)
async def test_a_malformed_narrowing_is_a_400(broker: BrokerHarness, query: str) -> None:
    """Malformed narrowing values are 400 RequestInvalid, and cost no STS call."""
    status, body = await broker.get_json(f"/v1/credentials/service-uploads?{query}", caller="svc-a")
    assert status == 400
    assert body["error"]["code"] == "RequestInvalid"
    assert broker.sts.emulator.assume_role_calls() == 0


async def test_narrowing_an_unusable_policy_is_the_same_403(broker: BrokerHarness) -> None:
    """A policy the caller may not use is refused the same way, narrowed or not."""
    for path in ["/v1/credentials/avatar-upload", "/v1/credentials/avatar-upload?prefix=x/"]:
        status, body = await broker.get_json(path, caller="svc-a")
        assert status == 403
        assert "may not be used by this caller" in body["error"]["message"]


async def test_several_grants_reply_with_the_primary_and_every_grant(
    broker: BrokerHarness,
) -> None:
    """Oss names the first grant as before and lists every grant under Oss.Grants."""
    status, body = await broker.get_json("/v1/credentials/report-jobs", caller="svc-a")
    assert status == 200
    assert body["Oss"] == {
        "Bucket": "examplebucket",
        "Region": "cn-hangzhou",
        "Endpoint": "https://oss-cn-hangzhou.aliyuncs.com",
        "Prefix": "reports/",
        "AddressStyle": "virtual",
        "Grants": [
            {"Bucket": "examplebucket", "Prefix": "reports/", "Actions": ["get", "list"]},
            {
                "Bucket": "examplebucket",
                "Prefix": "services/svc-a/",
                "Actions": ["put", "multipart", "get", "list"],
            },
        ],
    }
    assert len(_statements(broker)) == 4


async def test_narrowing_several_grants_to_one_replies_as_one(broker: BrokerHarness) -> None:
    """A multi-grant token narrowed to one grant has no Grants list: it is a one-grant reply."""
    path = "/v1/credentials/report-jobs?prefix=services/svc-a/run-7/&actions=put"
    status, body = await broker.get_json(path, caller="svc-a")
    assert status == 200
    assert "Grants" not in body["Oss"]
    assert body["Oss"]["Prefix"] == "services/svc-a/run-7/"


async def test_a_short_lived_token_expires_at_its_deadline(broker: BrokerHarness) -> None:
    """effective_lifetime_seconds 120: Expiration is fetch time + 120 s, in the Policy and reply."""
    broker.clock.now = 1_800_000_000.0
    status, body = await broker.get_json("/v1/credentials/quick-upload", caller="alice")
    assert status == 200
    assert body["Expiration"] == "2027-01-15T08:02:00Z" == body["Credentials"]["Expiration"]
    assert body["ExpiresIn"] == 120
    [statement] = _statements(broker)
    assert statement["Condition"] == {"DateLessThan": {"acs:CurrentTime": "2027-01-15T08:02:00Z"}}
    expires = datetime(2027, 1, 15, 8, 2, tzinfo=UTC).timestamp()
    assert expires == 1_800_000_000 + 120


async def test_a_short_lived_token_is_served_until_the_margin(broker: BrokerHarness) -> None:
    """The 60 s margin holds: served 60 s, then a new token with a new deadline."""
    _, first = await broker.get_json("/v1/credentials/quick-upload", caller="alice")
    broker.clock.advance(59)
    _, same = await broker.get_json("/v1/credentials/quick-upload", caller="alice")
    assert (same["AccessKeyId"], same["ExpiresIn"]) == (first["AccessKeyId"], 61)
    broker.clock.advance(1)
    _, fresh = await broker.get_json("/v1/credentials/quick-upload", caller="alice")
    assert fresh["AccessKeyId"] != first["AccessKeyId"]
    assert fresh["ExpiresIn"] == 120
    assert broker.sts.emulator.assume_role_calls() == 2


async def test_min_ttl_of_a_short_lived_token_is_bounded_by_its_lifetime(
    broker: BrokerHarness,
) -> None:
    """min_ttl_seconds goes up to effective_lifetime_seconds minus the margin (60 here)."""
    path = "/v1/credentials/quick-upload?min_ttl_seconds="
    status, _ = await broker.get_json(path + "60", caller="alice")
    assert status == 200
    status, body = await broker.get_json(path + "61", caller="alice")
    assert status == 400
    assert "from 0 to 60" in body["error"]["message"]


async def test_a_lifetime_within_the_margin_is_refused_not_fetched(
    make_broker: BrokerFactory,
) -> None:
    """With a margin as long as the lifetime no token could be served: 500, and no STS call."""
    broker = await make_broker(cache={"refresh_margin_seconds": 120})
    status, body = await broker.get_json("/v1/credentials/quick-upload", caller="alice")
    assert status == 500
    assert "must exceed cache.refresh_margin_seconds (120)" in body["error"]["message"]
    assert broker.sts.emulator.assume_role_calls() == 0


async def test_narrowing_works_through_a_credentials_uri(broker: BrokerHarness) -> None:
    """The official alibabacloud-credentials URI provider takes a narrowed URI as it is."""
    key = CALLERS["svc-a"][0]
    query = f"prefix=services/svc-a/uri/&actions=get&access_token={key}"
    uri = str(broker.client.make_url(f"/v1/credentials/service-uploads?{query}"))
    credential = await CredentialClient(
        provider=URLCredentialsProvider(uri=uri)
    ).get_credential_async()
    [call] = broker.sts.emulator.calls
    assert broker.sts.emulator.issued[credential.access_key_id].policy == call.params["Policy"]
    assert [s["Resource"] for s in _statements(broker)] == [
        ["acs:oss:*:*:examplebucket/services/svc-a/uri/*"]
    ]
