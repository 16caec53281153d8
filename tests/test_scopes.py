"""A caller's scope: rendered grants and conditions, and narrowing that can never widen it."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.dev.emulators.oss_ram import condition_values
from broker.dev.emulators.ram import RequestContext, evaluate
from broker.errors import AccessDenied, BucketAmbiguous, RequestInvalid
from broker.models import Principal
from broker.policies import Policy, PolicySet
from broker.scopes import (
    Narrowing,
    Scope,
    grant_to_sign,
    narrow,
    parse_narrowing,
    render_policy,
    scope_for,
)

BOUNDED = settings(max_examples=400, deadline=None, database=None)

ALICE = Principal(subject="alice", groups=("internal",), source_ip="203.0.113.7")

BASE: dict[str, Any] = {
    "name": "jobs",
    "role_arn": "acs:ram::1234567890123456:role/oss-jobs",
    "region": "cn-hangzhou",
    "grants": [
        {"bucket": "examplebucket", "prefix": "reports/", "actions": ["get", "list"]},
        {
            "bucket": "examplebucket",
            "prefix": "services/${subject}/",
            "actions": ["put", "multipart", "get", "list", "delete"],
        },
        {"bucket": "otherbucket", "prefix": "shared/", "actions": ["get"]},
    ],
    "duration_seconds": 3600,
    "max_url_expires_seconds": 600,
    "callers": ["group:internal"],
}


def make_policy(**changes: Any) -> Policy:
    return Policy.model_validate({**BASE, **changes})


JOBS = make_policy()


def _narrow(policy: Policy = JOBS, **query: str) -> Scope:
    narrowing = parse_narrowing({name: [value] for name, value in query.items()})
    assert narrowing is not None
    return narrow(scope_for(policy, ALICE), narrowing)


def _resources(scope: Scope) -> list[tuple[list[str], list[str]]]:
    return [(s["Action"], s["Resource"]) for s in json.loads(scope.document)["Statement"]]


# --- rendering ---


def test_every_grant_is_rendered_for_the_caller() -> None:
    """Each grant's template is filled with the caller's values; the first is the primary."""
    scope = scope_for(JOBS, ALICE)
    assert [(g.bucket, g.prefix) for g in scope.grants] == [
        ("examplebucket", "reports/"),
        ("examplebucket", "services/alice/"),
        ("otherbucket", "shared/"),
    ]
    assert (scope.bucket, scope.prefix, scope.key, scope.narrowed) == (
        "examplebucket",
        "reports/",
        None,
        False,
    )
    assert scope.budget.total == len(scope.document)


def test_grant_for_finds_the_grant_holding_a_key() -> None:
    """grant_for: the first grant whose bucket and prefix hold the key, else None."""
    scope = scope_for(JOBS, ALICE)
    own = scope.grant_for("services/alice/out.csv")
    assert own is not None
    assert own.prefix == "services/alice/"
    assert scope.grant_for("services/alice2/out.csv") is None
    assert scope.grant_for("shared/a", bucket="examplebucket") is None
    shared = scope.grant_for("shared/a", bucket="otherbucket")
    assert shared is not None
    assert shared.bucket == "otherbucket"


# --- the grant a presigned URL or post policy is signed under ---

ONE_BUCKET = make_policy(grants=BASE["grants"][:2])


def test_grant_to_sign_picks_the_grant_holding_the_key_in_the_one_bucket() -> None:
    """With one bucket, no bucket is needed: the grant holding the key and allowing the action."""
    scope = scope_for(ONE_BUCKET, ALICE)
    grant = grant_to_sign(scope, "services/alice/out.csv", "put", None, "put_object")
    assert (grant.bucket, grant.prefix) == ("examplebucket", "services/alice/")
    read = grant_to_sign(scope, "reports/q3.csv", "get", None, "get_object")
    assert read.prefix == "reports/"


def test_grant_to_sign_refuses_an_action_the_holding_grant_lacks() -> None:
    """A put under a read-only grant's prefix is a 403 naming that grant's bucket and prefix."""
    scope = scope_for(ONE_BUCKET, ALICE)
    with pytest.raises(AccessDenied) as err:
        grant_to_sign(scope, "reports/q3.csv", "put", None, "put_object")
    assert err.value.message == (
        "policy jobs does not allow put_object under examplebucket/reports/ "
        "(its grant there allows get, list)"
    )
    with pytest.raises(AccessDenied, match="key is outside this caller's prefixes reports/, "):
        grant_to_sign(scope, "services/bob/x", "get", None, "get_object")


def test_grant_to_sign_asks_for_a_bucket_when_the_grants_name_several() -> None:
    """Several buckets and none named: 400 BucketAmbiguous listing them; a named one decides."""
    scope = scope_for(JOBS, ALICE)
    with pytest.raises(BucketAmbiguous) as err:
        grant_to_sign(scope, "shared/a.csv", "get", None, "get_object")
    assert (err.value.status, err.value.code) == (400, "BucketAmbiguous")
    assert err.value.message.endswith("give bucket: examplebucket, otherbucket")
    shared = grant_to_sign(scope, "shared/a.csv", "get", "otherbucket", "get_object")
    assert (shared.bucket, shared.prefix) == ("otherbucket", "shared/")
    with pytest.raises(AccessDenied, match="outside this caller's prefix shared/"):
        grant_to_sign(scope, "reports/a.csv", "get", "otherbucket", "get_object")
    with pytest.raises(AccessDenied, match="grants nothing in bucket nobucket"):
        grant_to_sign(scope, "shared/a.csv", "get", "nobucket", "get_object")


def test_grant_to_sign_uses_any_holding_grant_that_allows_the_action() -> None:
    """Overlapping grants: the URL is signed under the one that allows it, not just the first."""
    grants = [
        {"bucket": "examplebucket", "prefix": "data/", "actions": ["get"]},
        {"bucket": "examplebucket", "prefix": "data/${subject}/", "actions": ["put"]},
    ]
    scope = scope_for(make_policy(grants=grants), ALICE)
    grant = grant_to_sign(scope, "data/alice/x", "put", None, "put_object")
    assert grant.prefix == "data/alice/"
    with pytest.raises(AccessDenied, match="does not allow put_object under examplebucket/data/ "):
        grant_to_sign(scope, "data/bob/x", "put", None, "put_object")


def test_policy_conditions_and_grant_conditions_both_apply() -> None:
    """Policy-wide conditions come first in every statement; a grant's own follow in its own."""
    grants = [
        {**BASE["grants"][0], "conditions": {"secure_transport": True}},
        BASE["grants"][1],
    ]
    policy = make_policy(grants=grants, conditions={"source_ip": "caller"})
    statements = json.loads(scope_for(policy, ALICE).document)["Statement"]
    assert [s.get("Condition") for s in statements] == [
        {"IpAddress": {"acs:SourceIp": ["203.0.113.7"]}, "Bool": {"acs:SecureTransport": "true"}},
        {
            "StringLike": {"oss:Prefix": ["reports/*"]},
            "IpAddress": {"acs:SourceIp": ["203.0.113.7"]},
            "Bool": {"acs:SecureTransport": "true"},
        },
        {"IpAddress": {"acs:SourceIp": ["203.0.113.7"]}},
        {
            "StringLike": {"oss:Prefix": ["services/alice/*"]},
            "IpAddress": {"acs:SourceIp": ["203.0.113.7"]},
        },
    ]


def test_fixed_networks_vpcs_and_https_render_without_a_caller_address() -> None:
    """Static conditions need no address; the JSON of acs:SourceVpc is pinned here."""
    conditions = {
        "source_ip": ["10.0.0.0/8", "2001:db8::/32", "198.51.100.9/32"],
        "source_vpc": ["vpc-bp1example"],
        "secure_transport": True,
    }
    policy = make_policy(grants=[BASE["grants"][0]], conditions=conditions)
    scope = scope_for(policy, Principal(subject="alice", groups=("internal",)))
    assert json.loads(scope.document)["Statement"][0]["Condition"] == {
        "IpAddress": {"acs:SourceIp": ["10.0.0.0/8", "2001:db8::/32", "198.51.100.9"]},
        "StringEquals": {"acs:SourceVpc": ["vpc-bp1example"]},
        "Bool": {"acs:SecureTransport": "true"},
    }


def test_a_caller_bound_policy_without_an_address_is_refused() -> None:
    """source_ip: caller and no known address: 400, never a token without the condition."""
    policy = make_policy(conditions={"source_ip": "caller"})
    with pytest.raises(RequestInvalid, match="address is unknown"):
        scope_for(policy, Principal(subject="alice", groups=("internal",)))
    with pytest.raises(RequestInvalid):
        scope_for(policy, Principal(subject="alice", groups=("internal",), source_ip="a.b"))


def test_an_ipv4_mapped_caller_is_bound_as_ipv4() -> None:
    """::ffff:192.0.2.1 is bound as 192.0.2.1, the address RAM sees."""
    policy = make_policy(conditions={"source_ip": "caller"})
    mapped = Principal(subject="alice", groups=("internal",), source_ip="::ffff:192.0.2.1")
    grant = scope_for(policy, mapped).grants[0]
    assert grant.conditions == (("IpAddress", "acs:SourceIp", ("192.0.2.1",)),)


def test_render_policy_takes_one_grant_policies_only() -> None:
    """render_policy(policy, prefix) is for one-grant policies; several grants need scope_for."""
    with pytest.raises(ValueError, match="several grants"):
        render_policy(JOBS, "reports/")


def test_scope_memo_keeps_one_scope_per_caller_address() -> None:
    """PolicySet.scope remembers bound scopes per address, and unbound ones regardless of it."""
    bound = make_policy(name="bound", conditions={"source_ip": "caller"})
    policies = PolicySet({"bound": bound, "jobs": JOBS})
    elsewhere = Principal(subject="alice", groups=("internal",), source_ip="198.51.100.1")
    one, two = policies.scope("bound", ALICE), policies.scope("bound", elsewhere)
    assert one is not None
    assert two is not None
    assert one.digest != two.digest
    assert policies.scope("bound", ALICE) is one
    assert policies.scope("jobs", ALICE) is policies.scope("jobs", elsewhere)


# --- parsing the narrowing query ---


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ({"prefix": ["a/", "b/"]}, "give prefix at most once"),
        ({"prefix": ["services/alice/x/"], "key": ["services/alice/k"]}, "prefix or key"),
        ({"prefix": ["services/alice"]}, "prefix must be"),
        ({"prefix": ["services/*/"]}, "prefix must be"),
        ({"prefix": ["services/../"]}, "prefix must be"),
        ({"prefix": ["/services/"]}, "prefix must be"),
        ({"prefix": ["a/" * 600]}, "prefix must be"),
        ({"key": ["services/alice/"]}, "key must be"),
        ({"key": ["services/alice/a?b"]}, "key must be"),
        ({"key": ["services/alice/x y"]}, "key must be"),
        ({"bucket": ["Example_Bucket"]}, "bucket must be"),
        ({"actions": ["get,write"]}, "comma-separated list"),
        ({"actions": [""]}, "comma-separated list"),
        ({"actions": ["get,get"]}, "twice"),
        ({"key": ["services/alice/k"], "actions": ["get,list"]}, "cannot list"),
    ],
)
def test_malformed_narrowing_is_a_400_that_does_not_echo(
    query: dict[str, list[str]], message: str
) -> None:
    """A malformed narrowing is RequestInvalid saying what is allowed, without the value."""
    with pytest.raises(RequestInvalid, match=message) as refused:
        parse_narrowing(query)
    for values in query.values():
        for value in values:
            if "*" in value or "?" in value or " " in value or ".." in value:
                assert value not in refused.value.message


def test_no_narrowing_parameters_mean_no_narrowing() -> None:
    """Without bucket, prefix, key or actions the scope is used whole."""
    assert parse_narrowing({}) is None
    assert parse_narrowing({"min_ttl_seconds": ["60"]}) is None


def test_narrowing_values_are_parsed() -> None:
    """Each parameter is kept as given; actions split on commas, in the caller's order."""
    query = {"bucket": ["examplebucket"], "key": ["services/alice/a.csv"], "actions": ["put,get"]}
    assert parse_narrowing(query) == Narrowing(
        bucket="examplebucket", key="services/alice/a.csv", actions=("put", "get")
    )


# --- narrowing ---


def test_a_sub_prefix_keeps_only_the_grants_holding_it() -> None:
    """prefix=services/alice/run-1/ leaves one grant, cut to that prefix."""
    scope = _narrow(prefix="services/alice/run-1/")
    assert scope.narrowed
    assert [(g.bucket, g.prefix, g.actions) for g in scope.grants] == [
        ("examplebucket", "services/alice/run-1/", ("put", "multipart", "get", "list", "delete"))
    ]
    assert scope.digest != scope_for(JOBS, ALICE).digest


def test_a_sibling_or_parent_prefix_is_refused_naming_it() -> None:
    """Outside every grant: 403 naming the prefix and the caller's own prefixes."""
    for prefix in ("services/alice2/", "services/", "services/bob/"):
        with pytest.raises(AccessDenied) as refused:
            _narrow(prefix=prefix)
        assert prefix in refused.value.message
        assert "reports/, services/alice/, shared/" in refused.value.message


def test_a_key_gives_exactly_one_object_without_listing() -> None:
    """key=services/alice/a.csv: that object only, the grant's actions less list."""
    scope = _narrow(key="services/alice/a.csv")
    assert scope.key == "services/alice/a.csv"
    assert _resources(scope) == [
        (
            [
                "oss:PutObject",
                "oss:AbortMultipartUpload",
                "oss:ListParts",
                "oss:GetObject",
                "oss:DeleteObject",
            ],
            ["acs:oss:*:*:examplebucket/services/alice/a.csv"],
        )
    ]


def test_fewer_actions_drop_the_grants_left_with_none() -> None:
    """actions=put keeps only the grants that can put, with put alone."""
    scope = _narrow(actions="put")
    assert [(g.prefix, g.actions) for g in scope.grants] == [("services/alice/", ("put",))]


def test_an_action_no_grant_has_is_refused_naming_it() -> None:
    """actions=delete where only reads are granted: 403 naming delete."""
    with pytest.raises(AccessDenied, match="does not grant delete"):
        _narrow(prefix="reports/2024/", actions="get,delete")


def test_a_bucket_keeps_only_its_grants() -> None:
    """bucket=otherbucket keeps its one grant; a bucket the policy never names is a 403."""
    assert [g.bucket for g in _narrow(bucket="otherbucket").grants] == ["otherbucket"]
    with pytest.raises(AccessDenied, match="grants nothing in bucket nobucket"):
        _narrow(bucket="nobucket")


def test_narrowing_a_caller_bound_scope_keeps_the_binding() -> None:
    """Narrowing never drops a condition: the narrowed token is bound to the same address."""
    policy = make_policy(conditions={"source_ip": "caller"})
    [grant] = _narrow(policy, key="services/alice/a.csv").grants
    assert grant.conditions == (("IpAddress", "acs:SourceIp", ("203.0.113.7",)),)


def test_a_narrowing_too_long_for_sts_is_a_400() -> None:
    """A narrowed document over 2,048 characters is refused, not sent."""
    policy = make_policy(grants=[BASE["grants"][1]] * 4)  # fits with 64-character values
    deep = "services/alice/" + "b" * 200 + "/"
    with pytest.raises(RequestInvalid, match="over its 2048"):
        _narrow(policy, prefix=deep)


# --- narrowing never widens: what a narrowed token may do, the whole one may ---

_BASES = st.sampled_from(
    [
        "",
        "reports/",
        "reports/2024/",
        "services/",
        "services/alice/",
        "services/alice/run-1/",
        "services/alice2/",
        "services/bob/",
        "shared/",
        "shared/x/",
    ]
)
_SEGMENTS = st.sampled_from(["alice", "run-1", "2024", "x", "a.csv"])
_PATHS = st.builds(
    lambda base, rest: base + "/".join(rest), _BASES, st.lists(_SEGMENTS, min_size=1, max_size=2)
)
_ACTIONS = st.sampled_from(["put", "multipart", "get", "list", "delete"])
_RAM_ACTIONS = st.sampled_from(
    [
        "oss:PutObject",
        "oss:GetObject",
        "oss:DeleteObject",
        "oss:AbortMultipartUpload",
        "oss:ListParts",
        "oss:ListObjects",
    ]
)


@st.composite
def _narrowings(draw: st.DrawFn) -> dict[str, list[str]]:
    query: dict[str, list[str]] = {}
    if draw(st.booleans()):
        query["bucket"] = [draw(st.sampled_from(["examplebucket", "otherbucket", "nobucket"]))]
    where = draw(st.sampled_from(["prefix", "key", None]))
    if where == "prefix":
        query["prefix"] = [draw(st.one_of(_PATHS.map(lambda path: path + "/"), _BASES))]
    elif where == "key":
        query["key"] = [draw(_PATHS)]
    if draw(st.booleans()):
        actions = draw(st.lists(_ACTIONS, min_size=1, max_size=3, unique=True))
        query["actions"] = [",".join(actions)]
    return query


def _allowed(document: str, action: str, bucket: str, path: str) -> bool:
    listing = action == "oss:ListObjects"
    resource = f"acs:oss:cn-hangzhou:1234567890123456:{bucket}"
    values = condition_values(
        1_800_000_000, "203.0.113.7", secure=True, list_params={"prefix": path} if listing else None
    )
    if not listing:
        resource += f"/{path}"
    return evaluate(document, RequestContext(action, resource, values)) == "Allow"


@BOUNDED
@given(query=_narrowings(), data=st.data())
def test_narrowing_never_widens(query: dict[str, list[str]], data: st.DataObject) -> None:
    """Whatever a narrowed token may do (RAM's own evaluation), the un-narrowed one may too."""
    whole = scope_for(JOBS, ALICE)
    try:
        narrowing = parse_narrowing(query)
        narrowed = narrow(whole, narrowing) if narrowing is not None else whole
    except (AccessDenied, RequestInvalid):
        return  # refused: nothing was issued
    whole_resources = [r for s in json.loads(whole.document)["Statement"] for r in s["Resource"]]
    for statement in json.loads(narrowed.document)["Statement"]:
        for resource in statement["Resource"]:
            assert any(resource.startswith(r.rstrip("*")) for r in whole_resources), resource
    near = [grant.key or grant.prefix + "a.csv" for grant in narrowed.grants]
    paths = st.one_of(
        _PATHS, st.sampled_from(near), st.sampled_from([g.prefix for g in narrowed.grants])
    )
    buckets = st.sampled_from(["examplebucket", "otherbucket"])
    for action, bucket, path in data.draw(
        st.lists(st.tuples(_RAM_ACTIONS, buckets, paths), max_size=8)
    ):
        if _allowed(narrowed.document, action, bucket, path):
            assert _allowed(whole.document, action, bucket, path), (query, action, bucket, path)


def test_narrowed_tokens_still_do_what_they_were_narrowed_to() -> None:
    """The property above is not vacuous: a narrowed token allows its own key and prefix."""
    scope = _narrow(prefix="services/alice/run-1/", actions="put,list")
    assert _allowed(scope.document, "oss:PutObject", "examplebucket", "services/alice/run-1/x")
    assert _allowed(scope.document, "oss:ListObjects", "examplebucket", "services/alice/run-1/")
    assert not _allowed(scope.document, "oss:PutObject", "examplebucket", "services/alice/x")
    assert not _allowed(scope.document, "oss:GetObject", "examplebucket", "services/alice/run-1/x")
    one = _narrow(key="services/alice/a.csv")
    assert _allowed(one.document, "oss:GetObject", "examplebucket", "services/alice/a.csv")
    assert not _allowed(one.document, "oss:GetObject", "examplebucket", "services/alice/a.csv2")
