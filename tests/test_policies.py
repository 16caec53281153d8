"""Policy files → PolicySet → rendered RAM inline policies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pydantic
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from broker.errors import ConfigError, TemplateValueRejected
from broker.models import Principal
from broker.names import CALLER_ID, is_caller_id
from broker.policies import (
    MAX_POLICY_CHARS,
    Policy,
    PolicySet,
    load_policies,
    load_policy_file,
    load_policy_files,
    may_use,
    render_policy,
    render_prefix,
    scope_for,
)
from broker.templates import check_template_value

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ROOT / "policies"
BAD = Path(__file__).resolve().parent / "data" / "policies_bad"

BOUNDED = settings(max_examples=300, deadline=None, database=None)

ALICE = Principal(subject="alice", groups=("browser",))

BASE: dict[str, Any] = {
    "name": "test-policy",
    "role_arn": "acs:ram::1234567890123456:role/oss-test",
    "bucket": "examplebucket",
    "region": "cn-hangzhou",
    "prefix": "uploads/${subject}/",
    "actions": ["put", "list"],
    "duration_seconds": 900,
    "max_url_expires_seconds": 600,
    "callers": ["group:browser"],
}


def make_policy(**changes: Any) -> Policy:
    return Policy.model_validate({**BASE, **changes})


@pytest.fixture(scope="module")
def examples() -> PolicySet:
    return load_policies(POLICIES)


# --- example policies ---


def test_example_policies_load(examples: PolicySet) -> None:
    """The shipped example policies load, sorted by name, each remembering its file."""
    assert [p.name for p in examples] == ["avatar-upload", "reports-read", "service-uploads"]
    assert len(examples) == 3
    for policy in examples:
        assert Path(policy.source) == POLICIES / f"{policy.name}.yaml"
        assert policy.bucket == "examplebucket"
        assert policy.region == "cn-hangzhou"
        assert policy.oss_endpoint == "oss-cn-hangzhou.aliyuncs.com"
        assert 900 <= policy.duration_seconds <= 3600
    assert examples.get("nope") is None


AVATAR_ALICE = (
    '{"Version":"1","Statement":[{"Effect":"Allow","Action":["oss:PutObject"],'
    '"Resource":["acs:oss:*:*:examplebucket/avatars/alice/*"]}]}'
)
SERVICE_ALICE = (
    '{"Version":"1","Statement":[{"Effect":"Allow","Action":["oss:PutObject",'
    '"oss:AbortMultipartUpload","oss:ListParts","oss:GetObject"],'
    '"Resource":["acs:oss:*:*:examplebucket/services/alice/*"]},'
    '{"Effect":"Allow","Action":["oss:ListObjects"],"Resource":["acs:oss:*:*:examplebucket"],'
    '"Condition":{"StringLike":{"oss:Prefix":["services/alice/*"]}}}]}'
)
REPORTS_ALICE = (
    '{"Version":"1","Statement":[{"Effect":"Allow","Action":["oss:GetObject"],'
    '"Resource":["acs:oss:*:*:examplebucket/reports/*"]},'
    '{"Effect":"Allow","Action":["oss:ListObjects"],"Resource":["acs:oss:*:*:examplebucket"],'
    '"Condition":{"StringLike":{"oss:Prefix":["reports/*"]}}}]}'
)


@pytest.mark.parametrize(
    ("name", "prefix", "document"),
    [
        ("avatar-upload", "avatars/alice/", AVATAR_ALICE),
        ("service-uploads", "services/alice/", SERVICE_ALICE),
        ("reports-read", "reports/", REPORTS_ALICE),
    ],
)
def test_example_renders_exactly(
    examples: PolicySet, name: str, prefix: str, document: str
) -> None:
    """Each example renders to exactly this minified RAM policy for alice."""
    policy = examples.get(name)
    assert policy is not None
    scope = scope_for(policy, ALICE)
    assert scope.prefix == prefix
    assert scope.document == document
    assert render_policy(policy, prefix) == document
    assert len(scope.digest) == 64


def test_rendering_is_independent_of_action_order() -> None:
    """Reordered actions render the same document, so cache keys agree."""
    one = make_policy(actions=["get", "multipart", "put", "delete", "list"])
    two = make_policy(actions=["list", "delete", "put", "multipart", "get"])
    assert scope_for(one, ALICE).document == scope_for(two, ALICE).document
    statement = json.loads(scope_for(one, ALICE).document)["Statement"][0]
    assert statement["Action"] == [
        "oss:PutObject",
        "oss:AbortMultipartUpload",
        "oss:ListParts",
        "oss:GetObject",
        "oss:DeleteObject",
    ]


def test_list_only_policy_has_no_object_statement() -> None:
    """A list-only policy grants ListObjects under the prefix and no object action."""
    document = json.loads(scope_for(make_policy(actions=["list"]), ALICE).document)
    assert [s["Action"] for s in document["Statement"]] == [["oss:ListObjects"]]


def test_render_policy_refuses_unsafe_prefixes() -> None:
    """render_policy refuses an empty, wildcard or unterminated prefix rather than widen."""
    policy = make_policy()
    for prefix in ["", "/", "uploads/*/", "uploads/alice", "uploads/../", "uploads//", "a?/"]:
        with pytest.raises(ValueError, match="prefix"):
            render_policy(policy, prefix)


def test_render_policy_refuses_oversized_document() -> None:
    """render_policy refuses a document over STS's 2,048 characters."""
    with pytest.raises(ValueError, match="2048"):
        render_policy(make_policy(), "a/" * MAX_POLICY_CHARS)


def test_endpoint_override() -> None:
    """An explicit endpoint replaces the region's public OSS endpoint."""
    assert make_policy(endpoint="127.0.0.1:9001").oss_endpoint == "127.0.0.1:9001"


def test_static_prefix_may_be_empty() -> None:
    """A template of just ${subject}/ is allowed and renders to the subject alone."""
    assert render_prefix(make_policy(prefix="${subject}/"), ALICE) == "alice/"


def test_digest_tells_sets_apart(examples: PolicySet) -> None:
    """Equal contents give equal digests; a changed policy changes the digest."""
    again = load_policies(POLICIES)
    assert again.digest == examples.digest
    changed = {p.name: p for p in again}
    changed["reports-read"] = Policy.model_validate(
        {**changed["reports-read"].model_dump(), "duration_seconds": 901}
    )
    assert PolicySet(changed).digest != examples.digest


# --- bad files ---

BAD_FILES = [
    ("syntax_error.yaml", 4, None, "invalid YAML"),
    ("duplicate_key.yaml", 7, "prefix", "duplicate key (first at line 6)"),
    ("not_mapping.yaml", 1, "(top level)", "must be a YAML mapping"),
    ("unknown_key.yaml", 11, "content_type", "did you mean content_types?"),
    ("source_key.yaml", 11, "source", "set by the broker"),
    ("missing_bucket.yaml", 1, "bucket", "Field required"),
    ("undefined_variable.yaml", 6, "prefix", "variable ${subjct} is not defined"),
    ("bad_action.yaml", 7, "actions.1", "'put', 'multipart', 'get', 'list' or 'delete'"),
    ("duplicate_action.yaml", 7, "actions", "listed twice"),
    ("actions_not_list.yaml", 7, "actions", "must be a YAML list"),
    ("duration_range.yaml", 8, "duration_seconds", "allowed: 900..43200"),
    ("bool_duration.yaml", 8, "duration_seconds", "valid integer"),
    ("url_expires_range.yaml", 9, "max_url_expires_seconds", "allowed: 1..604800"),
    ("prefix_no_slash.yaml", 6, "prefix", "must end with /"),
    ("prefix_leading_slash.yaml", 6, "prefix", "must not start with /"),
    ("wildcard_prefix.yaml", 6, "prefix", "must not contain * or ?"),
    ("variable_mid_segment.yaml", 6, "prefix", "${subject} must end its path segment"),
    ("two_variables.yaml", 6, "prefix", "more than one variable"),
    ("dot_segment.yaml", 6, "prefix", ". or .. path segment"),
    ("empty_segment.yaml", 6, "prefix", "empty path segment"),
    ("bad_static_char.yaml", 6, "prefix", "character ' ' is not allowed"),
    ("oversized.yaml", 6, "prefix", "rendered policy would be 2401 characters, over STS's 2,048"),
    ("bad_bucket.yaml", 4, "bucket", "'Example_Bucket' is not allowed; OSS bucket names are 3-63"),
    ("bad_name.yaml", 2, "name", "'Bad_Name' is not allowed"),
    ("bad_role_arn.yaml", 3, "role_arn", "acs:ram::<account>:role/<name>"),
    ("empty_callers.yaml", 10, "callers", "at least one caller"),
    ("bad_caller.yaml", 10, "callers.0", "group:NAME"),
    ("bad_content_type.yaml", 11, "content_types.0", "MIME type/subtype such as image/png"),
    ("duplicate_content_type.yaml", 11, "content_types", "listed twice"),
    ("max_bytes_range.yaml", 11, "max_object_bytes", "allowed: 1..5368709120"),
    ("bad_external_id.yaml", 11, "external_id", "2-1224 of"),
    ("string_forbid_overwrite.yaml", 11, "forbid_overwrite", "valid boolean"),
]


@pytest.mark.parametrize(("filename", "line", "key", "fragment"), BAD_FILES)
def test_bad_file_names_file_line_and_key(
    filename: str, line: int, key: str | None, fragment: str
) -> None:
    """Each kind of mistake is refused with exactly one `file:line: key: problem`."""
    path = BAD / filename
    with pytest.raises(ConfigError) as caught:
        load_policy_file(path)
    [problem] = caught.value.problems
    head = f"{path}:{line}: " if key is None else f"{path}:{line}: {key}: "
    assert problem.startswith(head), problem
    assert fragment in problem, problem


def test_every_bad_fixture_is_covered() -> None:
    """Every fixture file is pinned by a case above."""
    assert {p.name for p in BAD.glob("*.yaml")} == {case[0] for case in BAD_FILES}


def test_external_id_is_not_echoed() -> None:
    """A refused external_id is not repeated in the problem."""
    with pytest.raises(ConfigError) as caught:
        load_policy_file(BAD / "bad_external_id.yaml")
    assert "sekrit" not in str(caught.value)


def test_duplicate_names_name_both_files() -> None:
    """Two files with one name are refused with a problem naming both."""
    first, second = BAD / "duplicate" / "first.yaml", BAD / "duplicate" / "second.yaml"
    with pytest.raises(ConfigError) as caught:
        load_policies(BAD / "duplicate")
    [problem] = caught.value.problems
    assert problem.startswith(f"{second}:2: name: ")
    assert f"already defined in {first}" in problem


def test_files_given_together_must_have_distinct_names() -> None:
    """load_policy_files refuses a name given in two files, naming both; one file twice is fine."""
    first, second = BAD / "duplicate" / "first.yaml", BAD / "duplicate" / "second.yaml"
    with pytest.raises(ConfigError) as caught:
        load_policy_files([first, second])
    assert caught.value.problems == [
        f"{second}:2: name: policy 'same-name' is already defined in {first}; "
        "policy names must be unique"
    ]
    assert [policy.name for policy in load_policy_files([first, first])] == ["same-name"]


def test_directory_collects_every_problem_of_every_file() -> None:
    """Loading a directory reports the problems of all its files at once."""
    with pytest.raises(ConfigError) as caught:
        load_policies(BAD)
    for filename, *_ in BAD_FILES:
        assert any(p.startswith(f"{BAD / filename}:") for p in caught.value.problems), filename


def test_missing_or_empty_directory_is_an_error(tmp_path: Path) -> None:
    """A missing directory, or one without policy files, is an error."""
    with pytest.raises(ConfigError, match="does not exist"):
        load_policies(tmp_path / "missing")
    (tmp_path / "notes.txt").write_text("not a policy")
    (tmp_path / ".#avatar-upload.yaml").write_text("editor lock file")
    with pytest.raises(ConfigError, match="no policy files"):
        load_policies(tmp_path)


def test_yml_files_load(tmp_path: Path) -> None:
    """Both .yaml and .yml files are policy files."""
    shutil.copy(POLICIES / "avatar-upload.yaml", tmp_path / "avatar-upload.yml")
    shutil.copy(POLICIES / "reports-read.yaml", tmp_path / "reports-read.yaml")
    assert [p.name for p in load_policies(tmp_path)] == ["avatar-upload", "reports-read"]


def test_source_cannot_come_from_yaml() -> None:
    """`source` is not part of the file schema."""
    schema = Policy.model_json_schema()
    assert "source" not in schema["properties"]
    assert "source" not in make_policy(source="x").model_dump()


# --- callers and variables ---


def test_may_use_by_id_and_group(examples: PolicySet) -> None:
    """callers matches an API key caller's id, or any of the caller's groups."""
    reports = examples.get("reports-read")
    assert reports is not None
    assert may_use(reports, Principal(subject="svc-reports"))
    assert may_use(reports, Principal(subject="svc-other", groups=("internal",)))
    assert not may_use(reports, Principal(subject="svc-other", groups=("browser",)))
    assert not may_use(reports, Principal(subject="group:internal"))


def test_jwt_subject_never_matches_a_caller_id(examples: PolicySet) -> None:
    """A JWT whose subject equals a caller id does not get that caller's policies."""
    reports = examples.get("reports-read")
    assert reports is not None
    assert not may_use(reports, Principal(subject="svc-reports", auth_method="jwt"))
    assert may_use(reports, Principal(subject="u1", groups=("internal",), auth_method="jwt"))


@pytest.mark.parametrize("caller", ["a..b", "group:a..b", "group:", "group:group:x", "-a"])
def test_callers_follow_the_caller_id_rule(caller: str) -> None:
    """A callers entry is an id or group:NAME by the caller-id rule, so never holds '..'."""
    with pytest.raises(pydantic.ValidationError, match="group:NAME"):
        make_policy(callers=[caller])


def test_group_variable_is_first_listed_group_in_principal_order() -> None:
    """${group} is the caller's first group (its own order) that callers lists."""
    policy = make_policy(
        prefix="teams/${group}/${subject}/", callers=["group:browser", "group:internal"]
    )
    caller = Principal(subject="alice", groups=("staff", "internal", "browser"))
    assert render_prefix(policy, caller) == "teams/internal/alice/"


def test_group_variable_without_listed_group_is_rejected() -> None:
    """${group} with no listed group is refused, naming only the variable."""
    policy = make_policy(prefix="teams/${group}/", callers=["alice", "group:browser"])
    with pytest.raises(TemplateValueRejected) as caught:
        render_prefix(policy, Principal(subject="alice", groups=("staff",)))
    assert caught.value.context["variable"] == "${group}"


def test_claim_variable_resolves_and_missing_claim_is_rejected() -> None:
    """${claim:NAME} renders the claim; a missing or unsafe claim is refused."""
    policy = make_policy(prefix="tenants/${claim:tenant}/${subject}/")
    tenant = Principal(subject="alice", claims={"tenant": "acme"})
    assert render_prefix(policy, tenant) == "tenants/acme/alice/"
    for claims in [{}, {"tenant": "*"}, {"other": "acme"}]:
        with pytest.raises(TemplateValueRejected) as caught:
            render_prefix(policy, Principal(subject="alice", claims=claims))
        assert caught.value.context["variable"] == "${claim:tenant}"
        assert "${claim:tenant}" in caught.value.message


@pytest.mark.parametrize(
    "value",
    [
        "",
        "*",
        "a*",
        "a?b",
        "a/b",
        "a\\b",
        "..",
        "a..b",
        ".a",
        "-a",
        "a b",
        "a\n",
        "a\x00",
        "é",
        "a" * 65,
    ],
)
def test_check_template_value_rejects_without_echo(value: str) -> None:
    """Unsafe values are refused, and the message never contains the value."""
    with pytest.raises(ValueError, match="template value") as caught:
        check_template_value(value)
    if len(value) > 1:
        assert value not in str(caught.value)


def test_rejected_subject_is_never_echoed() -> None:
    """TemplateValueRejected names the variable, never the value."""
    with pytest.raises(TemplateValueRejected) as caught:
        scope_for(make_policy(), Principal(subject="s3cret*token"))
    assert "s3cret" not in str(caught.value)
    assert "s3cret" not in repr(caught.value.context)


# --- properties ---

ADVERSARIAL = st.text(
    alphabet=st.sampled_from(list("aZ09._@-*?/\\$ {}%\t\n\r\x00\x7fé\u202e\u0130\uff0f")),
    max_size=70,
)
NEARLY_SAFE = st.text(alphabet=st.sampled_from(list("aZ09._@-")), min_size=1, max_size=66)
SEGMENT = CALLER_ID
SUBJECTS = st.one_of(
    st.text(max_size=80), ADVERSARIAL, NEARLY_SAFE, st.from_regex(SEGMENT, fullmatch=True)
)


@BOUNDED
@given(SUBJECTS)
def test_any_subject_is_rejected_or_stays_in_one_segment(subject: str) -> None:
    """Any subject is refused, or every Resource and oss:Prefix stays under its own segment."""
    policy = make_policy(prefix="uploads/${subject}/", actions=["put", "get", "list"])
    try:
        scope = scope_for(policy, Principal(subject=subject))
    except TemplateValueRejected:
        return
    assert subject == check_template_value(subject)
    assert SEGMENT.fullmatch(subject)
    assert ".." not in subject
    assert scope.prefix == f"uploads/{subject}/"
    under = f"acs:oss:*:*:examplebucket/uploads/{subject}/"
    for statement in json.loads(scope.document)["Statement"]:
        for resource in statement["Resource"]:
            if resource != "acs:oss:*:*:examplebucket":
                assert resource == f"{under}*"
        condition = statement.get("Condition")
        if condition is not None:
            assert condition == {"StringLike": {"oss:Prefix": [f"uploads/{subject}/*"]}}
    # Only the wildcards the renderer writes: 2 per acs:oss:*:* ARN, 1 after each prefix.
    assert scope.document.count("*") == 2 + 2 + 1 + 1


@BOUNDED
@given(SUBJECTS)
def test_check_template_value_is_the_caller_id_rule(value: str) -> None:
    """check_template_value accepts exactly what names.is_caller_id accepts."""
    try:
        check_template_value(value)
    except ValueError:
        assert not is_caller_id(value)
    else:
        assert is_caller_id(value)


@BOUNDED
@given(SUBJECTS, SUBJECTS)
def test_distinct_subjects_never_nest(one: str, two: str) -> None:
    """Two distinct accepted subjects never give prefixes where one starts the other."""
    assume(one != two)
    policy = make_policy(prefix="uploads/u-${subject}/")
    try:
        first = render_prefix(policy, Principal(subject=one))
        second = render_prefix(policy, Principal(subject=two))
    except TemplateValueRejected:
        return
    assert not first.startswith(second)
    assert not second.startswith(first)


@BOUNDED
@given(st.text(alphabet=st.sampled_from(list("ab.")), min_size=1, max_size=6))
def test_dotted_subjects_never_nest_with_their_extensions(subject: str) -> None:
    """A subject and the same subject extended never give nesting prefixes."""
    policy = make_policy()
    prefixes = []
    for candidate in (subject, subject + "a", subject + ".a"):
        try:
            prefixes.append(render_prefix(policy, Principal(subject=candidate)))
        except TemplateValueRejected:
            continue
    for first in prefixes:
        for second in prefixes:
            assert first == second or not first.startswith(second)


@BOUNDED
@given(NEARLY_SAFE, SUBJECTS)
def test_group_and_claim_values_are_checked_like_subjects(group: str, tenant: str) -> None:
    """${group} and ${claim:NAME} values pass the same safe-value check as ${subject}."""
    assume(is_caller_id(group))  # what callers accepts
    policy = make_policy(prefix="t/${claim:tenant}/${group}/", callers=[f"group:{group}"])
    caller = Principal(subject="alice", groups=("staff", group), claims={"tenant": tenant})
    try:
        prefix = render_prefix(policy, caller)
    except TemplateValueRejected:
        return
    assert prefix == f"t/{check_template_value(tenant)}/{check_template_value(group)}/"


def test_scope_memo_ignores_claims_no_prefix_uses() -> None:
    """Per-token claims (jti, nonce) do not grow the scope memo: one entry per caller."""
    policies = load_policies(POLICIES)
    for jti in ("a1", "b2", "c3"):
        principal = Principal("alice", ("browser",), auth_method="jwt", claims={"jti": jti})
        scope = policies.scope("avatar-upload", principal)
        assert scope is not None
        assert scope.prefix == "avatars/alice/"
    assert len(policies._scopes) == 1


def test_federation_oidc_needs_a_provider_arn_and_the_arn_needs_federation() -> None:
    """``federation: oidc`` and ``oidc_provider_arn`` go together; a malformed ARN is refused."""
    arn = "acs:ram::1234567890123456:oidc-provider/my-idp"
    policy = make_policy(federation="oidc", oidc_provider_arn=arn)
    assert (policy.federation, policy.oidc_provider_arn) == ("oidc", arn)
    assert make_policy().federation == "none"
    for changes in (
        {"federation": "oidc"},
        {"oidc_provider_arn": arn},
        {"federation": "oidc", "oidc_provider_arn": "acs:ram::1:role/x"},
        {"federation": "saml", "oidc_provider_arn": arn},
    ):
        with pytest.raises(pydantic.ValidationError):
            make_policy(**changes)
