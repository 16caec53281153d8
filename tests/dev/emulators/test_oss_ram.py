"""The OSS emulator's authorization: resources, Deny over Allow, conditions it observes."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import alibabacloud_oss_v2 as oss
import pytest
from yarl import URL

from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.oss_ram import authorize, condition_values
from broker.dev.emulators.sts import IssuedCredentials
from tests.dev.emulators.conftest import BUCKET, Creds, Harness, assume_role, sdk_client

ROLE_ARN = "acs:ram::1234567890123456:role/uploader"


def _token(*statements: dict[str, Any]) -> IssuedCredentials:
    policy = json.dumps({"Version": "1", "Statement": list(statements)}) if statements else ""
    return IssuedCredentials("STS.id", "secret", "token", 0.0, ROLE_ARN, "session", policy)


NOW = 1_700_000_000.0
VALUES = condition_values(NOW, "127.0.0.1", secure=False)


def _allowed(
    issued: IssuedCredentials,
    action: str,
    key: str | None,
    values: dict[str, str | None] = VALUES,
) -> bool:
    """Whether authorize lets it through; a refusal must be OSS's policy AccessDenied."""
    refusal: OssError | None = None
    try:
        authorize(issued, action, "bucket", key, "cn-hangzhou", values)
    except OssError as err:
        refusal = err
    if refusal is not None:
        assert (refusal.code, refusal.ec) == ("AccessDenied", "0003-00000301")
    return refusal is None


def test_no_inline_policy_allows() -> None:
    """A token without an inline policy has its role's rights, which the emulator allows."""
    assert _allowed(_token(), "oss:DeleteObject", "any/key")


@pytest.mark.parametrize(
    ("resource", "key", "allowed"),
    [
        ("acs:oss:*:*:bucket/u/alice/*", "u/alice/a.png", True),
        ("acs:oss:*:*:bucket/u/alice/*", "u/alice2/a.png", False),
        ("acs:oss:*:*:bucket/u/?/x", "u/b/x", True),
        ("acs:oss:*:*:bucket/u/?/x", "u/bb/x", False),
        ("acs:oss:cn-hangzhou:1234567890123456:bucket/k", "k", True),
        ("acs:oss:cn-shanghai:*:bucket/k", "k", False),
        ("acs:oss:*:*:bucket/U/*", "u/a", False),
    ],
)
def test_resource_wildcards_match_as_ram_does(resource: str, key: str, allowed: bool) -> None:
    """`*` spans any run, `?` one character; region and account take part; case counts."""
    issued = _token({"Effect": "Allow", "Action": "oss:PutObject", "Resource": resource})
    assert _allowed(issued, "oss:PutObject", key) is allowed


def test_actions_compare_without_case() -> None:
    """oss:putobject in a policy allows oss:PutObject."""
    issued = _token({"Effect": "Allow", "Action": ["oss:putobject"], "Resource": "*"})
    assert _allowed(issued, "oss:PutObject", "k")
    assert not _allowed(issued, "oss:GetObject", "k")


def test_deny_wins_over_allow() -> None:
    """An explicit Deny on a narrower resource beats a broader Allow."""
    issued = _token(
        {"Effect": "Allow", "Action": "oss:*", "Resource": "acs:oss:*:*:bucket/u/*"},
        {"Effect": "Deny", "Action": "oss:*", "Resource": "acs:oss:*:*:bucket/u/private/*"},
    )
    assert _allowed(issued, "oss:GetObject", "u/a")
    assert not _allowed(issued, "oss:GetObject", "u/private/a")


def test_not_action_and_not_resource_invert_the_match() -> None:
    """NotAction/NotResource apply to everything they do not name."""
    issued = _token({"Effect": "Allow", "NotAction": "oss:DeleteObject", "Resource": "*"})
    assert _allowed(issued, "oss:PutObject", "k")
    assert not _allowed(issued, "oss:DeleteObject", "k")
    issued = _token(
        {"Effect": "Allow", "Action": "oss:*", "NotResource": "acs:oss:*:*:bucket/secret/*"}
    )
    assert _allowed(issued, "oss:GetObject", "public/k")
    assert not _allowed(issued, "oss:GetObject", "secret/k")


def test_list_prefix_condition_allows_only_the_rendered_prefix() -> None:
    """The broker's list grant (StringLike oss:Prefix) allows ListObjects on that prefix only."""
    issued = _token(
        {
            "Effect": "Allow",
            "Action": ["oss:ListObjects"],
            "Resource": ["acs:oss:*:*:bucket"],
            "Condition": {"StringLike": {"oss:Prefix": ["u/alice/*"]}},
        }
    )

    def listing(params: dict[str, str]) -> dict[str, str | None]:
        return condition_values(NOW, "127.0.0.1", secure=False, list_params=params)

    assert _allowed(issued, "oss:ListObjects", None, listing({"prefix": "u/alice/"}))
    assert _allowed(issued, "oss:ListObjects", None, listing({"prefix": "u/alice/2024/"}))
    assert not _allowed(issued, "oss:ListObjects", None, listing({"prefix": "u/bob/"}))
    assert not _allowed(issued, "oss:ListObjects", None, listing({"prefix": ""}))
    assert not _allowed(issued, "oss:ListObjects", None, listing({}))


def test_denial_names_the_action_and_the_kind_of_deny() -> None:
    """The AccessDenied detail carries AuthAction and ImplicitDeny/ExplicitDeny."""
    issued = _token({"Effect": "Deny", "Action": "oss:*", "Resource": "*"})
    with pytest.raises(OssError) as raised:
        authorize(issued, "oss:GetObject", "bucket", "k", "cn-hangzhou", VALUES)
    detail = raised.value.details["AccessDeniedDetail"]
    assert detail == {"AuthAction": "oss:GetObject", "NoPermissionType": "ExplicitDeny"}


def test_condition_values_are_what_the_emulator_observes() -> None:
    """Peer address, plain HTTP, the clock's time; no VPC; list parameters only when listing."""
    values = condition_values(NOW, "127.0.0.2", secure=False, list_params={"prefix": "p/"})
    assert values == {
        "acs:currenttime": "2023-11-14T22:13:20+00:00",
        "acs:sourceip": "127.0.0.2",
        "acs:securetransport": "false",
        "acs:sourcevpc": None,
        "oss:prefix": "p/",
        "oss:delimiter": None,
    }


def _conditional_policy(condition: dict[str, Any]) -> str:
    statement = {
        "Effect": "Allow",
        "Action": ["oss:PutObject", "oss:GetObject"],
        "Resource": ["acs:oss:*:*:examplebucket/user/alice/*"],
        "Condition": condition,
    }
    return json.dumps({"Version": "1", "Statement": [statement]})


async def _put_from(h: Harness, creds: Creds, local_ip: str = "127.0.0.1") -> int:
    """PUT through a V4-presigned URL, the TCP connection bound to ``local_ip``."""
    result = await presign_with(h, creds, oss.PutObjectRequest(bucket=BUCKET, key="user/alice/c"))
    connector = aiohttp.TCPConnector(local_addr=(local_ip, 0))
    async with (
        aiohttp.ClientSession(connector=connector, skip_auto_headers=["Content-Type"]) as session,
        session.put(URL(result.url, encoded=True), data=b"c") as response,
    ):
        return response.status


async def presign_with(h: Harness, creds: Creds, request: Any) -> oss.PresignResult:
    async with sdk_client(h, creds=creds) as client:
        return await client.presign(request, expires=timedelta(seconds=600))


async def test_source_ip_condition_binds_the_token_to_an_address(harness: Harness) -> None:
    """IpAddress on acs:SourceIp 127.0.0.1: allowed from 127.0.0.1, refused from 127.0.0.2."""
    policy = _conditional_policy({"IpAddress": {"acs:SourceIp": "127.0.0.1/32"}})
    creds = await assume_role(harness.sts_url, policy)
    assert await _put_from(harness, creds, "127.0.0.1") == 200
    assert await _put_from(harness, creds, "127.0.0.2") == 403
    assert harness.emulator.requests[-1].error_code == "AccessDenied"


async def test_current_time_condition_ends_the_token_early(harness: Harness) -> None:
    """DateLessThan acs:CurrentTime = issue + 120 s: works at 119 s, refused at 121 s."""
    deadline = datetime.fromtimestamp(harness.clock.now + 120, UTC).isoformat()
    policy = _conditional_policy({"DateLessThan": {"acs:CurrentTime": deadline}})
    creds = await assume_role(harness.sts_url, policy)
    harness.clock.advance(119)
    assert await _put_from(harness, creds) == 200
    harness.clock.advance(2)
    assert await _put_from(harness, creds) == 403


@pytest.mark.parametrize(
    ("condition", "status"),
    [
        ({"Bool": {"acs:SecureTransport": "false"}}, 200),
        ({"Bool": {"acs:SecureTransport": "true"}}, 403),
        ({"StringEquals": {"acs:SourceVpc": "vpc-example"}}, 403),
        ({"StringEquals": {"oss:x-oss-forbid-overwrite": "true"}}, 403),
    ],
    ids=["plain-http", "https-only", "vpc-only", "unknown-key"],
)
async def test_transport_vpc_and_unknown_conditions(
    harness: Harness, condition: dict[str, Any], status: int
) -> None:
    """Plain HTTP is SecureTransport false; no request comes from a VPC; unknown keys deny."""
    creds = await assume_role(harness.sts_url, _conditional_policy(condition))
    assert await _put_from(harness, creds) == status
