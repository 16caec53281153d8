"""RAM inline policies for OSS: grants, conditions, the fetch-time deadline, budgets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.ram import (
    DEADLINE_SAMPLE,
    RamGrant,
    grant_chars,
    measure,
    oss_policy_document,
    with_deadline,
)

BOUNDED = settings(max_examples=200, deadline=None, database=None)

REPORTS = RamGrant("examplebucket", "reports/", ("get", "list"))
OWN = RamGrant("examplebucket", "services/alice/", ("put", "multipart"))
BOUND = RamGrant(
    "examplebucket",
    "ingest/alice/",
    ("put",),
    conditions=(
        ("IpAddress", "acs:SourceIp", ("203.0.113.7",)),
        ("StringEquals", "acs:SourceVpc", ("vpc-bp1example",)),
        ("Bool", "acs:SecureTransport", "true"),
    ),
)


def test_two_grants_render_in_order_as_their_statements() -> None:
    """Each grant keeps its own statements, in the order the grants are listed."""
    assert oss_policy_document([REPORTS, OWN]) == (
        '{"Version":"1","Statement":['
        '{"Effect":"Allow","Action":["oss:GetObject"],'
        '"Resource":["acs:oss:*:*:examplebucket/reports/*"]},'
        '{"Effect":"Allow","Action":["oss:ListObjects"],"Resource":["acs:oss:*:*:examplebucket"],'
        '"Condition":{"StringLike":{"oss:Prefix":["reports/*"]}}},'
        '{"Effect":"Allow","Action":["oss:PutObject","oss:AbortMultipartUpload","oss:ListParts"],'
        '"Resource":["acs:oss:*:*:examplebucket/services/alice/*"]}]}'
    )


def test_network_conditions_render_as_alibaba_spells_them() -> None:
    """acs:SourceIp (IpAddress), acs:SourceVpc (StringEquals), acs:SecureTransport (Bool)."""
    [statement] = json.loads(oss_policy_document([BOUND]))["Statement"]
    assert statement["Condition"] == {
        "IpAddress": {"acs:SourceIp": ["203.0.113.7"]},
        "StringEquals": {"acs:SourceVpc": ["vpc-bp1example"]},
        "Bool": {"acs:SecureTransport": "true"},
    }


def test_a_listing_grant_keeps_its_prefix_condition_beside_the_grants() -> None:
    """The oss:Prefix condition and the grant's conditions share the list statement."""
    listing = RamGrant("b-1", "p/", ("list",), conditions=(BOUND.conditions[0],))
    [statement] = json.loads(oss_policy_document([listing]))["Statement"]
    assert statement["Condition"] == {
        "StringLike": {"oss:Prefix": ["p/*"]},
        "IpAddress": {"acs:SourceIp": ["203.0.113.7"]},
    }


def test_a_key_grant_names_exactly_that_object_and_never_lists() -> None:
    """A grant narrowed to one key has no wildcard and no ListObjects statement."""
    one = RamGrant("b-1", "p/", ("get", "list", "delete"), key="p/x.txt")
    assert json.loads(oss_policy_document([one]))["Statement"] == [
        {
            "Effect": "Allow",
            "Action": ["oss:GetObject", "oss:DeleteObject"],
            "Resource": ["acs:oss:*:*:b-1/p/x.txt"],
        }
    ]


def test_a_condition_given_twice_is_refused() -> None:
    """One operator and key twice in a grant is a bug, not something to merge silently."""
    twice = RamGrant("b-1", "p/", ("get",), conditions=(BOUND.conditions[0],) * 2)
    with pytest.raises(ValueError, match="given twice"):
        oss_policy_document([twice])


def test_deadline_goes_into_every_allow_statement() -> None:
    """with_deadline adds DateLessThan acs:CurrentTime to each Allow, beside its conditions."""
    document = with_deadline(oss_policy_document([REPORTS, BOUND]), "2026-11-21T05:02:00Z")
    statements = json.loads(document)["Statement"]
    assert len(statements) == 3
    for statement in statements:
        until = statement["Condition"]["DateLessThan"]
        assert until == {"acs:CurrentTime": "2026-11-21T05:02:00Z"}
    assert statements[1]["Condition"]["StringLike"] == {"oss:Prefix": ["reports/*"]}
    assert statements[2]["Condition"]["IpAddress"] == {"acs:SourceIp": ["203.0.113.7"]}


def test_deadline_leaves_deny_statements_alone() -> None:
    """A Deny must keep denying after the deadline: only Allow statements expire."""
    deny = {"Effect": "Deny", "Action": ["oss:*"], "Resource": ["*"]}
    document = json.dumps({"Version": "1", "Statement": [deny]})
    assert json.loads(with_deadline(document, DEADLINE_SAMPLE))["Statement"] == [deny]


def test_budget_is_the_grants_and_the_envelope() -> None:
    """measure: each grant's share plus the envelope is the document's length."""
    budget = measure([REPORTS, OWN])
    assert budget.total == len(oss_policy_document([REPORTS, OWN]))
    assert budget.grants == (grant_chars(REPORTS), grant_chars(OWN))
    assert budget.envelope == len('{"Version":"1","Statement":[]}') + 1  # and one comma


@BOUNDED
@given(
    prefixes=st.lists(st.from_regex(r"[a-z0-9]{1,20}/", fullmatch=True), min_size=1, max_size=4),
    seconds=st.integers(min_value=0, max_value=59),
)
def test_budget_with_deadline_is_exactly_what_is_sent(prefixes: list[str], seconds: int) -> None:
    """measure(deadline=True) counts the very characters with_deadline sends, for any deadline."""
    grants = [
        RamGrant("b-1", prefix, ("get", "list"), conditions=BOUND.conditions) for prefix in prefixes
    ]
    sent = with_deadline(oss_policy_document(grants), f"2031-01-02T03:04:{seconds:02d}Z")
    assert measure(grants, deadline=True).total == len(sent)
