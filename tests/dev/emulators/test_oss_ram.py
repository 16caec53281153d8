"""The OSS emulator's RAM evaluation: Deny over Allow, wildcards, Not*, Conditions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.oss_ram import authorize
from broker.dev.emulators.sts import IssuedCredentials

ROLE_ARN = "acs:ram::1234567890123456:role/uploader"


def _token(*statements: dict[str, Any]) -> IssuedCredentials:
    policy = json.dumps({"Version": "1", "Statement": list(statements)}) if statements else ""
    return IssuedCredentials("STS.id", "secret", "token", 0.0, ROLE_ARN, "session", policy)


def _allowed(issued: IssuedCredentials, action: str, key: str | None) -> bool:
    """Whether authorize lets it through; a refusal must be OSS's policy AccessDenied."""
    refusal: OssError | None = None
    try:
        authorize(issued, action, "bucket", key, "cn-hangzhou")
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


def test_statements_with_conditions_never_allow_and_always_deny() -> None:
    """A Condition is not evaluated: as Allow it never applies, as Deny it always does."""
    condition = {"IpAddress": {"acs:SourceIp": "10.0.0.0/8"}}
    allow = {"Effect": "Allow", "Action": "oss:*", "Resource": "*", "Condition": condition}
    assert not _allowed(_token(allow), "oss:PutObject", "k")
    deny = {**allow, "Effect": "Deny"}
    plain = {"Effect": "Allow", "Action": "oss:*", "Resource": "*"}
    assert not _allowed(_token(plain, deny), "oss:PutObject", "k")
