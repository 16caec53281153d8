"""Policy files → validated ``PolicySet``; a caller's scope → minified RAM inline policy.

Prefix templates are parsed and their values checked in ``broker.templates``;
the RAM document itself is written by ``broker.ram``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    AfterValidator,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic.json_schema import SkipJsonSchema

from broker.errors import ConfigError, TemplateValueRejected
from broker.models import Principal
from broker.names import CALLER_ID_CHARS, POLICY_NAME_PATTERN, POLICY_NAME_RULE, is_caller_id
from broker.ram import MAX_POLICY_CHARS, oss_policy_document
from broker.templates import (
    MAX_VALUE_CHARS,
    check_template_value,
    claim_names,
    fill_template,
    parse_template,
)
from broker.yamldoc import (
    YamlDocument,
    format_validation_error,
    load_yaml,
    unknown_key_problem,
)

__all__ = [
    "MAX_POLICY_CHARS",
    "Policy",
    "PolicySet",
    "Scope",
    "load_policies",
    "load_policy_file",
    "load_policy_files",
    "may_use",
    "render_policy",
    "render_prefix",
    "scope_for",
]

_MAX_MEMO_SCOPES = 200_000
"""Rendered scopes a ``PolicySet`` remembers before it forgets them all and starts again."""

_WORST_CASE_VALUE = "a" * MAX_VALUE_CHARS

# Bare caller ids name API-key (or mTLS) callers from the config.  A JWT's
# subject is chosen by the identity provider, so it never matches a bare id:
# a browser user whose ``sub`` is "svc-reports" must not get that service's policies.
_ID_AUTH_METHODS = frozenset({"api_key", "mtls"})

_Action = Literal["put", "multipart", "get", "list", "delete"]

# --- field validators (messages are for ops: what is wrong, what is allowed) ---


def _matching(pattern: str, allowed: str, *, echo: bool = True) -> AfterValidator:
    compiled = re.compile(pattern)

    def check(value: str) -> str:
        if compiled.fullmatch(value) is None:
            shown = f"{value!r} is not allowed" if echo else "value is not allowed"
            raise ValueError(f"{shown}; {allowed}")
        return value

    return AfterValidator(check)


def _between(low: int, high: int, unit: str) -> AfterValidator:
    def check(value: int) -> int:
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range; allowed: {low}..{high} {unit}")
        return value

    return AfterValidator(check)


def _as_list(value: Any) -> Any:
    if not isinstance(value, list | tuple):
        raise ValueError("must be a YAML list, e.g. [a, b]")
    return value


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    for index, value in enumerate(values):
        if value in values[:index]:
            raise ValueError(f"{value!r} is listed twice; list each entry once")
    return values


def _non_empty(what: str) -> AfterValidator:
    def check(values: tuple[str, ...]) -> tuple[str, ...]:
        if not values:
            raise ValueError(f"must list at least one {what}")
        return values

    return AfterValidator(check)


def _check_caller(value: str) -> str:
    """An entry of ``callers``: a caller id, or ``group:`` and a group name (the same rule)."""
    if not is_caller_id(value.removeprefix("group:")):
        raise ValueError(
            f"{value!r} is not allowed; use an id or group:NAME, "
            f"1-64 of {CALLER_ID_CHARS} starting with a letter or digit, without '..'"
        )
    return value


_Name = Annotated[StrictStr, _matching(POLICY_NAME_PATTERN, POLICY_NAME_RULE)]
_RoleArn = Annotated[
    StrictStr,
    _matching(r"acs:ram::[0-9]+:role/[A-Za-z0-9.@_-]{1,64}", "use acs:ram::<account>:role/<name>"),
]
_OidcProviderArn = Annotated[
    StrictStr,
    _matching(
        r"acs:ram::[0-9]+:oidc-provider/[A-Za-z0-9.-]{1,128}",
        "use acs:ram::<account>:oidc-provider/<name>",
    ),
]
_Bucket = Annotated[
    StrictStr,
    _matching(
        r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]",
        "OSS bucket names are 3-63 of a-z 0-9 -, no - at either end",
    ),
]
_Region = Annotated[StrictStr, _matching(r"[a-z0-9-]+", "use a region id such as cn-hangzhou")]
_Endpoint = Annotated[
    StrictStr,
    _matching(
        r"(https?://)?[a-z0-9]([a-z0-9.-]{0,251}[a-z0-9])?(:[0-9]{1,5})?",
        "use a host such as oss-cn-hangzhou.aliyuncs.com, optionally with http(s):// and :port",
    ),
]
_ExternalId = Annotated[
    StrictStr,
    _matching(
        r"[A-Za-z0-9=,.@:/_-]{2,1224}", "use 2-1224 of A-Z a-z 0-9 = , . @ : / _ -", echo=False
    ),
]
_Caller = Annotated[StrictStr, AfterValidator(_check_caller)]
_MIME_PART = r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}"
_ContentType = Annotated[
    StrictStr,
    _matching(
        f"{_MIME_PART}/{_MIME_PART}", "use a MIME type/subtype such as image/png, no wildcards"
    ),
]
_CallbackUrl = Annotated[
    StrictStr, _matching(r"https?://[^\s/?#@]+(/[^\s#]*)?", "use an http(s) URL")
]

_AsList = BeforeValidator(_as_list)
_Unique = AfterValidator(_unique)
_Actions = Annotated[
    tuple[_Action, ...], _AsList, _Unique, _non_empty("action (put, multipart, get, list, delete)")
]
_Callers = Annotated[
    tuple[_Caller, ...], _AsList, _Unique, _non_empty("caller (an id or group:NAME)")
]
_ContentTypes = Annotated[tuple[_ContentType, ...], _AsList, _Unique]
_CallbackUrls = Annotated[tuple[_CallbackUrl, ...], _AsList, _Unique]


class Policy(pydantic.BaseModel):
    """One validated policy file.

    ``prefix`` is declared after ``bucket`` and ``actions`` because its
    validation renders the worst-case document, which needs both.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: _Name
    description: StrictStr = ""
    role_arn: _RoleArn
    bucket: _Bucket
    region: _Region
    actions: _Actions
    prefix: StrictStr
    duration_seconds: Annotated[StrictInt, _between(900, 43200, "seconds")]
    max_url_expires_seconds: Annotated[StrictInt, _between(1, 604800, "seconds")]
    content_types: _ContentTypes = ()
    max_object_bytes: Annotated[StrictInt, _between(1, 5368709120, "bytes")] | None = None
    callers: _Callers
    external_id: _ExternalId | None = None
    endpoint: _Endpoint | None = None
    callback_urls: _CallbackUrls = ()
    federation: Literal["none", "oidc"] = "none"
    """``oidc``: JWT callers' own tokens go to STS AssumeRoleWithOIDC (others are refused)."""
    oidc_provider_arn: _OidcProviderArn | None = None
    """The RAM OIDC provider that ``federation: oidc`` names in AssumeRoleWithOIDC."""
    forbid_overwrite: StrictBool = False
    """Uploads by presigned URL or post policy must send ``x-oss-forbid-overwrite: true``."""
    source: SkipJsonSchema[str] = Field(default="", exclude=True)
    """The file this policy came from; set by the loader, never read from the file."""

    @property
    def oss_endpoint(self) -> str:
        """The OSS endpoint host: ``endpoint`` if set, else the region's public one."""
        return self.endpoint or f"oss-{self.region}.aliyuncs.com"

    @pydantic.model_validator(mode="after")
    def _check_federation(self) -> Policy:
        if (self.federation == "oidc") != (self.oidc_provider_arn is not None):
            raise ValueError("federation: oidc and oidc_provider_arn go together")
        return self

    @pydantic.field_validator("prefix")
    @classmethod
    def _check_prefix(cls, template: str, info: pydantic.ValidationInfo) -> str:
        segments = parse_template(template)
        bucket, actions = info.data.get("bucket"), info.data.get("actions")
        if bucket is None or actions is None:
            return template  # their own errors are already reported
        worst = oss_policy_document(bucket, actions, fill_template(segments, _WORST_CASE_VALUE))
        if len(worst) > MAX_POLICY_CHARS:
            raise ValueError(
                f"rendered policy would be {len(worst)} characters, over STS's 2,048 limit "
                f"(with {MAX_VALUE_CHARS}-character variable values); shorten the prefix"
            )
        return template


# --- rendering ---

_RENDERED_PREFIX = re.compile(r"(?:[A-Za-z0-9._@=+-]+/)+\Z")


def _group_of(policy: Policy, principal: Principal) -> str | None:
    listed = {
        caller.removeprefix("group:") for caller in policy.callers if caller.startswith("group:")
    }
    return next((group for group in principal.groups if group in listed), None)


def _value_of(variable: str, policy: Policy, principal: Principal) -> str | None:
    if variable == "subject":
        return principal.subject
    if variable == "group":
        return _group_of(policy, principal)
    return principal.claims.get(variable.removeprefix("claim:"))


def render_prefix(policy: Policy, principal: Principal) -> str:
    """The caller's concrete prefix, e.g. ``avatars/alice/``.

    Raises ``TemplateValueRejected`` naming only the variable when a value is
    missing or unsafe: the value is never rendered, and there is no fallback.
    """
    parts: list[str] = []
    for static, variable in parse_template(policy.prefix):
        parts.append(static)
        if variable is not None:
            raw = _value_of(variable, policy, principal)
            try:
                parts.append(check_template_value("" if raw is None else raw))
            except ValueError as err:
                raise TemplateValueRejected(
                    variable=f"${{{variable}}}", policy=policy.name, reason=str(err)
                ) from None
        parts.append("/")
    return "".join(parts)


def render_policy(policy: Policy, prefix: str) -> str:
    """The minified inline policy for ``prefix`` (already rendered, ending in ``/``).

    Never call AssumeRole without this Policy: without one, the token carries
    every permission of the role.  So an empty or oversized document is an
    error here, never something to send without.
    """
    if not prefix or _RENDERED_PREFIX.match(prefix) is None or ".." in prefix:
        raise ValueError(
            "prefix must be non-empty path segments of A-Z a-z 0-9 . _ @ = + -, each ending in /"
        )
    document = oss_policy_document(policy.bucket, policy.actions, prefix)
    if len(document) > MAX_POLICY_CHARS:
        raise ValueError(
            f"rendered policy is {len(document)} characters, over STS's {MAX_POLICY_CHARS} limit"
        )
    return document


@dataclass(frozen=True, slots=True)
class Scope:
    """What one caller may do under one policy: the prefix and the exact STS Policy."""

    policy: Policy
    prefix: str
    document: str
    digest: str
    """sha256 hex of ``document``; log this, not the document."""


def scope_for(policy: Policy, principal: Principal) -> Scope:
    """Render ``policy`` for ``principal`` (``TemplateValueRejected`` if it cannot be)."""
    prefix = render_prefix(policy, principal)
    document = render_policy(policy, prefix)
    return Scope(policy, prefix, document, hashlib.sha256(document.encode()).hexdigest())


def may_use(policy: Policy, principal: Principal) -> bool:
    """Whether ``callers`` lists this caller's id (API key / mTLS callers) or one of its groups."""
    ids = {caller for caller in policy.callers if not caller.startswith("group:")}
    if principal.auth_method in _ID_AUTH_METHODS and principal.subject in ids:
        return True
    return any(f"group:{group}" in policy.callers for group in principal.groups)


# --- policy sets and loading ---


@dataclass(frozen=True)
class PolicySet:
    """Every loaded policy by name; iterates in name order; replaced whole on reload."""

    policies: Mapping[str, Policy] = field(default_factory=dict)
    digest: str = field(init=False)
    """sha256 of every policy's canonical JSON (not its path), to tell sets apart."""
    _scopes: dict[tuple[object, ...], Scope | None] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )
    _claim_names: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ordered = {name: self.policies[name] for name in sorted(self.policies)}
        for name, policy in ordered.items():
            if policy.name != name:
                raise ValueError(f"policy {policy.name!r} is filed under {name!r}")
        canonical = json.dumps(
            [p.model_dump(mode="json") for p in ordered.values()], sort_keys=True
        )
        object.__setattr__(self, "policies", MappingProxyType(ordered))
        # Only claims a prefix uses key the scope memo (not jti, nonce, ...).
        used = frozenset().union(*(claim_names(policy.prefix) for policy in ordered.values()))
        object.__setattr__(self, "_claim_names", used)
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).hexdigest())

    def get(self, name: str) -> Policy | None:
        """The policy called ``name``, if any."""
        return self.policies.get(name)

    def scope(self, name: str, principal: Principal) -> Scope | None:
        """``principal``'s rendered scope of policy ``name``; ``None`` if absent or not allowed.

        Memoised per set (a reload brings a fresh, empty memo), so the hot path
        renders each caller's policy once; ``TemplateValueRejected`` is not memoised.
        """
        claims: tuple[tuple[str, str], ...] = ()
        if principal.claims and self._claim_names:
            used = self._claim_names
            claims = tuple(sorted(i for i in principal.claims.items() if i[0] in used))
        key = (name, principal.subject, principal.groups, principal.auth_method, claims)
        try:
            return self._scopes[key]
        except KeyError:
            pass
        policy = self.policies.get(name)
        scope = scope_for(policy, principal) if policy and may_use(policy, principal) else None
        if len(self._scopes) >= _MAX_MEMO_SCOPES:
            self._scopes.clear()
        self._scopes[key] = scope
        return scope

    def __contains__(self, name: object) -> bool:
        return name in self.policies

    def __iter__(self) -> Iterator[Policy]:
        return iter(self.policies.values())

    def __len__(self) -> int:
        return len(self.policies)


def _file_keys() -> frozenset[str]:
    return frozenset(Policy.model_fields) - {"source"}


def _unknown_key_problems(doc: YamlDocument, data: Mapping[Any, Any]) -> list[str]:
    allowed = _file_keys()
    problems = []
    for key in data:
        if key in allowed:
            continue
        if key == "source":
            problem = "is set by the broker from the file's path; remove it"
        else:
            problem = unknown_key_problem(str(key), allowed)
        problems.append(f"{doc.path}:{doc.line_of((str(key),))}: {key}: {problem}")
    return problems


def load_policy_file(path: Path) -> Policy:
    """Read and validate one policy file; ``ConfigError`` lists every problem as file:line: key."""
    return _load_file(path)[0]


def _load_file(path: Path) -> tuple[Policy, YamlDocument]:
    doc = load_yaml(path)
    if not isinstance(doc.data, dict):
        raise ConfigError(
            [f"{path}:1: (top level): a policy file must be a YAML mapping of keys to values"]
        )
    problems = _unknown_key_problems(doc, doc.data)
    known = {key: value for key, value in doc.data.items() if key in _file_keys()}
    try:
        policy = Policy.model_validate({**known, "source": str(path)})
    except pydantic.ValidationError as err:
        problems += format_validation_error(doc, err)
    if problems:
        raise ConfigError(sorted(problems, key=lambda problem: _line_in(problem, path)))
    return policy, doc


def _line_in(problem: str, path: Path) -> int:
    line = problem.removeprefix(f"{path}:").partition(":")[0]
    return int(line) if line.isdigit() else 0


def _policy_files(directory: Path) -> list[Path]:
    # Dotfiles are skipped: editors leave lock and swap files such as .#x.yaml.
    return sorted(
        path
        for pattern in ("*.yaml", "*.yml")
        for path in directory.glob(pattern)
        if not path.name.startswith(".")
    )


def load_policies(directory: Path) -> PolicySet:
    """Load every ``*.yaml``/``*.yml`` in ``directory``; one ``ConfigError`` lists all problems.

    Names must be unique across files.  An empty or missing directory is an
    error: a broker with no policies can only refuse every request.
    """
    if not directory.is_dir():
        raise ConfigError([f"{directory}: policies directory does not exist"])
    paths = _policy_files(directory)
    if not paths:
        raise ConfigError([f"{directory}: no policy files (*.yaml, *.yml) in this directory"])
    return load_policy_files(paths)


def load_policy_files(paths: Iterable[Path]) -> PolicySet:
    """Load these files as one set; one ``ConfigError`` lists every problem of every file.

    A name given in two files is refused, naming both; a file listed twice is read once.
    """
    problems: list[str] = []
    policies: dict[str, Policy] = {}
    for path in {path.resolve(): path for path in paths}.values():
        try:
            policy, doc = _load_file(path)
        except ConfigError as err:
            problems += err.problems
            continue
        first = policies.get(policy.name)
        if first is not None:
            problems.append(
                f"{path}:{doc.line_of(('name',))}: name: policy {policy.name!r} is already "
                f"defined in {first.source}; policy names must be unique"
            )
            continue
        policies[policy.name] = policy
    if problems:
        raise ConfigError(problems)
    return PolicySet(policies)
