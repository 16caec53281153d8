"""RAM policy evaluation: effects, wildcards, every condition operator, fail-closed conditions."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from broker.dev.emulators.ram import CONDITION_KEYS, Decision, RequestContext, evaluate

RESOURCE = "acs:oss:cn-hangzhou:1234567890123456:bucket/u/alice/a.txt"
DEADLINE = "2024-05-06T07:10:00Z"  # the policy's acs:CurrentTime bound
ISSUED = "2024-05-06T07:08:00+00:00"  # 120 s before the deadline


def _values(**changes: str | None) -> dict[str, str | None]:
    values: dict[str, str | None] = {
        "acs:currenttime": ISSUED,
        "acs:sourceip": "127.0.0.1",
        "acs:securetransport": "false",
        "acs:sourcevpc": None,
        "oss:prefix": None,
        "oss:delimiter": None,
    }
    return values | {key.replace("__", ":").lower(): value for key, value in changes.items()}


def _decide(
    condition: dict[str, Any] | None, effect: str = "Allow", **changes: str | None
) -> Decision:
    statement: dict[str, Any] = {"Effect": effect, "Action": "oss:GetObject", "Resource": "*"}
    if condition is not None:
        statement["Condition"] = condition
    policy = {"Version": "1", "Statement": [statement]}
    return evaluate(policy, RequestContext("oss:GetObject", RESOURCE, _values(**changes)))


def _holds(condition: dict[str, Any], **changes: str | None) -> bool:
    return _decide(condition, **changes) == "Allow"


def test_nothing_allowed_is_an_implicit_deny() -> None:
    """No matching statement: ImplicitDeny; an empty or statement-less document too."""
    assert evaluate({"Version": "1", "Statement": []}, _context()) == "ImplicitDeny"
    assert evaluate("{}", _context()) == "ImplicitDeny"


def _context(action: str = "oss:GetObject", resource: str = RESOURCE) -> RequestContext:
    return RequestContext(action, resource, _values())


def test_a_single_statement_object_is_accepted() -> None:
    """Statement may be one object instead of a list, as RAM's grammar allows."""
    policy = {"Version": "1", "Statement": {"Effect": "Allow", "Action": "oss:*", "Resource": "*"}}
    assert evaluate(policy, _context()) == "Allow"


def test_explicit_deny_wins_over_any_allow() -> None:
    """An Allow and a matching Deny: ExplicitDeny."""
    policy = {
        "Statement": [
            {"Effect": "Allow", "Action": "oss:*", "Resource": "*"},
            {"Effect": "Deny", "Action": "oss:Get*", "Resource": "acs:oss:*:*:bucket/u/*"},
        ]
    }
    assert evaluate(policy, _context()) == "ExplicitDeny"
    assert evaluate(policy, _context("oss:PutObject")) == "Allow"


def test_an_effect_other_than_allow_or_deny_is_ignored() -> None:
    """A statement with a misspelt Effect grants nothing."""
    policy = {"Statement": [{"Effect": "allow", "Action": "oss:*", "Resource": "*"}]}
    assert evaluate(policy, _context()) == "ImplicitDeny"


@pytest.mark.parametrize(
    ("operator", "policy_value", "request_value", "holds"),
    [
        ("StringEquals", "u/alice/", "u/alice/", True),
        ("StringEquals", "u/alice/", "U/alice/", False),
        ("StringNotEquals", "u/alice/", "u/bob/", True),
        ("StringNotEquals", "u/alice/", "u/alice/", False),
        ("StringEqualsIgnoreCase", "u/ALICE/", "u/alice/", True),
        ("StringNotEqualsIgnoreCase", "u/ALICE/", "u/alice/", False),
        ("StringLike", "u/alice/*", "u/alice/", True),
        ("StringLike", "u/alice/*", "u/alice/2024/x", True),
        ("StringLike", "u/alice/*", "u/alice", False),
        ("StringLike", "u/?/x", "u/b/x", True),
        ("StringLike", "u/?/x", "u/bb/x", False),
        ("StringLike", "u/alice/*", "U/alice/", False),
        ("StringNotLike", "u/alice/*", "u/bob/", True),
        ("StringNotLike", "u/alice/*", "u/alice/x", False),
    ],
)
def test_string_operators_on_oss_prefix(
    operator: str, policy_value: str, request_value: str, holds: bool
) -> None:
    """String operators compare oss:Prefix as documented: case, * and ? wildcards, negation."""
    condition = {operator: {"oss:Prefix": policy_value}}
    assert _holds(condition, oss__prefix=request_value) is holds


@pytest.mark.parametrize(
    ("operator", "now", "holds"),
    [
        ("DateLessThan", "2024-05-06T07:09:59Z", True),  # 119 s after issue
        ("DateLessThan", "2024-05-06T07:10:00Z", False),
        ("DateLessThan", "2024-05-06T07:10:01Z", False),  # 121 s after issue
        ("DateLessThanEquals", "2024-05-06T07:10:00Z", True),
        ("DateGreaterThan", "2024-05-06T07:10:01Z", True),
        ("DateGreaterThan", "2024-05-06T07:10:00Z", False),
        ("DateGreaterThanEquals", "2024-05-06T07:10:00Z", True),
        ("DateEquals", "2024-05-06T15:10:00+08:00", True),
        ("DateNotEquals", "2024-05-06T07:10:00Z", False),
    ],
)
def test_date_operators_on_current_time(operator: str, now: str, holds: bool) -> None:
    """Date operators compare acs:CurrentTime to the second, across time zones."""
    assert _holds({operator: {"acs:CurrentTime": DEADLINE}}, acs__currenttime=now) is holds


def test_a_deadline_with_an_offset_is_the_same_instant() -> None:
    """RAM's documented form 2019-08-12T17:00:00+08:00 is 09:00:00Z."""
    condition = {"DateLessThan": {"acs:CurrentTime": "2024-05-06T15:10:00+08:00"}}
    assert _holds(condition, acs__currenttime="2024-05-06T07:09:59+00:00")
    assert not _holds(condition, acs__currenttime="2024-05-06T07:10:00+00:00")


@pytest.mark.parametrize(
    ("operator", "policy_value", "holds"),
    [
        ("NumericEquals", "10", True),
        ("NumericNotEquals", "10", False),
        ("NumericLessThan", "11", True),
        ("NumericLessThanEquals", "10", True),
        ("NumericGreaterThan", "9.5", True),
        ("NumericGreaterThanEquals", "11", False),
    ],
)
def test_numeric_operators(operator: str, policy_value: str, holds: bool) -> None:
    """Numeric operators compare numbers (here on a numeric-valued oss:Delimiter stand-in)."""
    assert _holds({operator: {"oss:Delimiter": policy_value}}, oss__delimiter="10") is holds


@pytest.mark.parametrize(
    ("operator", "networks", "source", "holds"),
    [
        ("IpAddress", "127.0.0.1", "127.0.0.1", True),
        ("IpAddress", "127.0.0.1", "127.0.0.2", False),
        ("IpAddress", ["10.0.0.0/8", "127.0.0.0/24"], "127.0.0.2", True),
        ("IpAddress", "127.0.0.1/32", "::ffff:127.0.0.1", True),
        ("IpAddress", "::1", "::1", True),
        ("IpAddress", "127.0.0.1", "::1", False),
        ("NotIpAddress", "127.0.0.1", "127.0.0.2", True),
        ("NotIpAddress", ["127.0.0.0/8"], "127.0.0.2", False),
    ],
)
def test_ip_operators_on_source_ip(
    operator: str, networks: str | list[str], source: str, holds: bool
) -> None:
    """IpAddress/NotIpAddress match acs:SourceIp against addresses and CIDR ranges."""
    assert _holds({operator: {"acs:SourceIp": networks}}, acs__sourceip=source) is holds


@pytest.mark.parametrize(
    ("policy_value", "secure", "holds"),
    [
        ("false", "false", True),
        ("true", "false", False),
        (True, "true", True),
        ("TRUE", "true", True),
    ],
)
def test_bool_on_secure_transport(policy_value: object, secure: str, holds: bool) -> None:
    """Bool compares true/false (strings or JSON booleans) with acs:SecureTransport."""
    condition = {"Bool": {"acs:SecureTransport": policy_value}}
    assert _holds(condition, acs__securetransport=secure) is holds


def test_source_vpc_never_matches_outside_a_vpc() -> None:
    """acs:SourceVpc is absent: StringEquals never holds, StringNotEquals always does."""
    assert not _holds({"StringEquals": {"acs:SourceVpc": "vpc-123"}})
    assert _holds({"StringNotEquals": {"acs:SourceVpc": "vpc-123"}})
    deny = {"StringNotEquals": {"acs:SourceVpc": "vpc-123"}}
    assert _decide(deny, effect="Deny") == "ExplicitDeny"


def test_an_absent_key_fails_positive_and_passes_negated_operators() -> None:
    """oss:Prefix on a request without one: StringLike false, StringNotLike true."""
    assert not _holds({"StringLike": {"oss:Prefix": "*"}})
    assert _holds({"StringNotLike": {"oss:Prefix": "u/*"}})


def test_values_or_keys_and_operators_and() -> None:
    """Any value of a key may match; every key and every operator must hold."""
    values = {"StringLike": {"oss:Prefix": ["u/bob/*", "u/alice/*"]}}
    assert _holds(values, oss__prefix="u/alice/x")
    both = {
        "StringLike": {"oss:Prefix": "u/alice/*"},
        "IpAddress": {"acs:SourceIp": "127.0.0.1"},
    }
    assert _holds(both, oss__prefix="u/alice/x")
    assert not _holds(both, oss__prefix="u/alice/x", acs__sourceip="127.0.0.2")
    keys = {"StringEquals": {"oss:Prefix": "a", "oss:Delimiter": "/"}}
    assert _holds(keys, oss__prefix="a", oss__delimiter="/")
    assert not _holds(keys, oss__prefix="a", oss__delimiter="-")


def test_negated_operators_need_every_value_to_miss() -> None:
    """StringNotLike with several patterns holds only when none of them matches."""
    condition = {"StringNotLike": {"oss:Prefix": ["u/bob/*", "u/alice/*"]}}
    assert _holds(condition, oss__prefix="u/carol/")
    assert not _holds(condition, oss__prefix="u/alice/x")


def test_condition_key_names_ignore_case() -> None:
    """oss:prefix and OSS:PREFIX name the same key as oss:Prefix."""
    assert _holds({"StringEquals": {"OSS:PREFIX": "a"}}, oss__prefix="a")


@pytest.mark.parametrize(
    "condition",
    [
        {"StringEquals": {"oss:x-oss-forbid-overwrite": "true"}},
        {"StringEqualsIfExists": {"oss:Prefix": "a"}},
        {"DateLessThan": {"acs:CurrentTime": "tomorrow"}},
        {"IpAddress": {"acs:SourceIp": "not-an-ip"}},
        {"StringEquals": {"oss:Prefix": {"nested": "object"}}},
        {"StringEquals": "not an object"},
    ],
    ids=["unknown-key", "unknown-operator", "bad-date", "bad-ip", "bad-value", "bad-block"],
)
def test_what_cannot_be_evaluated_fails_closed_and_is_logged(condition: dict[str, Any]) -> None:
    """Unknown keys/operators or bad values: an Allow does not apply, a Deny does; logged."""
    with capture_logs() as logs:
        allow = _decide(condition, oss__prefix="a")
        deny = _decide(condition, effect="Deny", oss__prefix="a")
    assert (allow, deny) == ("ImplicitDeny", "ExplicitDeny")
    assert [entry["event"] for entry in logs] == ["ram_condition_not_evaluated"] * 2


def test_the_known_condition_keys() -> None:
    """The keys the emulator evaluates (issue 10's oss:Prefix, issue 12's acs:* keys)."""
    assert {
        "oss:prefix",
        "oss:delimiter",
        "acs:currenttime",
        "acs:sourceip",
        "acs:securetransport",
        "acs:sourcevpc",
    } == CONDITION_KEYS


_TEXT = st.text(alphabet="ab/*?", max_size=6)


@given(pattern=_TEXT, value=st.text(alphabet="ab/", max_size=6))
def test_not_like_is_exactly_the_negation_of_like(pattern: str, value: str) -> None:
    """For a present key, StringNotLike holds exactly when StringLike does not."""
    like = _holds({"StringLike": {"oss:Prefix": pattern}}, oss__prefix=value)
    not_like = _holds({"StringNotLike": {"oss:Prefix": pattern}}, oss__prefix=value)
    assert like != not_like


@given(value=st.text(alphabet="ua/", max_size=6))
def test_a_star_suffix_is_a_prefix_match(value: str) -> None:
    """StringLike "u/a/*" holds exactly for values that start with "u/a/"."""
    holds = _holds({"StringLike": {"oss:Prefix": "u/a/*"}}, oss__prefix=value)
    assert holds is value.startswith("u/a/")
