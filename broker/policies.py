"""Policy files → validated ``PolicySet``: who may have which grants, for how long, from where.

A policy grants one bucket, prefix template and actions (``bucket``,
``prefix``, ``actions``), or several (``grants``); it may bind its tokens to
network conditions (``conditions``) and to an effective lifetime shorter than
STS's 900 s (``effective_lifetime_seconds``).  Each file is refused at load if
its worst-case rendering could exceed STS's 2,048 characters.  Prefix templates
are parsed in ``broker.templates``, a caller's scope is rendered in
``broker.scopes``, the RAM document is written by ``broker.ram``.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import pydantic
from pydantic import (
    ConfigDict,
    Field,
    PrivateAttr,
    StrictBool,
    StrictInt,
    StrictStr,
)
from pydantic.json_schema import SkipJsonSchema

from broker.errors import ConfigError
from broker.models import Principal
from broker.policy_fields import (
    MAX_GRANTS,
    MISSING,
    ONE_GRANT_KEYS,
    Actions,
    Bucket,
    CallbackUrls,
    Callers,
    Conditions,
    ContentTypes,
    Endpoint,
    ExternalId,
    Grant,
    Grants,
    Name,
    OidcProviderArn,
    Region,
    Required,
    RoleArn,
    Template,
    between,
)
from broker.ram import MAX_POLICY_CHARS, Budget, Condition, RamGrant, measure
from broker.scopes import Scope, render_policy, render_prefix, scope_for
from broker.templates import MAX_VALUE_CHARS, claim_names, fill_template, parse_template
from broker.yamldoc import (
    YamlDocument,
    format_validation_error,
    load_yaml,
    unknown_key_problem,
)

__all__ = [
    "MAX_GRANTS",
    "MAX_POLICY_CHARS",
    "Conditions",
    "Grant",
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
    "worst_case_budget",
]

_MAX_MEMO_SCOPES = 200_000
"""Rendered scopes a ``PolicySet`` remembers before it forgets them all and starts again."""

_WORST_CASE_VALUE = "a" * MAX_VALUE_CHARS
_WORST_CASE_ADDRESS = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
"""The longest address ``source_ip: caller`` can render (IPv4-mapped ones render as IPv4)."""

# Bare caller ids name API-key (or mTLS) callers from the config.  A JWT's
# subject is chosen by the identity provider, so it never matches a bare id:
# a browser user whose ``sub`` is "svc-reports" must not get that service's policies.
_ID_AUTH_METHODS = frozenset({"api_key", "mtls"})


class Policy(pydantic.BaseModel):
    """One validated policy file.

    A file gives ``bucket``, ``prefix`` and ``actions`` (one grant) or
    ``grants`` (several); either way ``grants`` lists them all, and ``bucket``,
    ``prefix`` and ``actions`` are the first (primary) grant's.  The fields a
    size check needs are declared before the ones it checks (``prefix``,
    ``grants``), because a validator sees only the fields declared before it.
    """

    model_config = ConfigDict(frozen=True, extra="forbid", serialize_by_alias=True)

    name: Name
    description: StrictStr = ""
    role_arn: RoleArn
    region: Region
    duration_seconds: Annotated[StrictInt, between(900, 43200, "seconds")]
    effective_lifetime_seconds: Annotated[StrictInt, between(60, 43199, "seconds")] | None = None
    conditions: Conditions | None = None
    one_bucket: Annotated[Bucket | None, Required] = Field(None, alias="bucket")
    one_actions: Annotated[Actions | None, Required] = Field(None, alias="actions")
    one_prefix: Annotated[Template | None, Required] = Field(None, alias="prefix")
    listed_grants: Grants | None = Field(None, alias="grants")
    max_url_expires_seconds: Annotated[StrictInt, between(1, 604800, "seconds")]
    content_types: ContentTypes = ()
    max_object_bytes: Annotated[StrictInt, between(1, 5368709120, "bytes")] | None = None
    multipart_part_bytes: Annotated[StrictInt, between(102400, 5368709120, "bytes")] | None = None
    """With ``max_object_bytes``: the part size presigned multipart uploads must keep to,
    which bounds the assembled object (``broker.uploads``)."""
    callers: Callers
    external_id: ExternalId | None = None
    endpoint: Endpoint | None = None
    callback_urls: CallbackUrls = ()
    federation: Literal["none", "oidc"] = "none"
    """``oidc``: JWT callers' own tokens go to STS AssumeRoleWithOIDC (others are refused)."""
    oidc_provider_arn: OidcProviderArn | None = None
    """The RAM OIDC provider that ``federation: oidc`` names in AssumeRoleWithOIDC."""
    forbid_overwrite: StrictBool = False
    """Uploads by presigned URL or post policy must send ``x-oss-forbid-overwrite: true``."""
    source: SkipJsonSchema[str] = Field(default="", exclude=True)
    """The file this policy came from; set by the loader, never read from the file."""
    _grants: tuple[Grant, ...] = PrivateAttr(default=())

    @pydantic.model_validator(mode="before")
    @classmethod
    def _mark_missing(cls, data: Any) -> Any:
        """Without ``grants``, ``bucket``, ``prefix`` and ``actions`` are required."""
        if not isinstance(data, dict) or data.get("grants") is not None:
            return data
        return {**dict.fromkeys(ONE_GRANT_KEYS, MISSING), **data}

    @pydantic.field_validator("effective_lifetime_seconds")
    @classmethod
    def _check_lifetime(cls, lifetime: int | None, info: pydantic.ValidationInfo) -> int | None:
        duration = info.data.get("duration_seconds")
        if lifetime is not None and duration is not None and lifetime >= duration:
            raise ValueError(
                f"must be less than duration_seconds ({duration}): it shortens the token"
            )
        return lifetime

    @pydantic.field_validator("one_prefix")
    @classmethod
    def _check_prefix(cls, template: str | None, info: pydantic.ValidationInfo) -> str | None:
        bucket, actions = info.data.get("one_bucket"), info.data.get("one_actions")
        if template is None or bucket is None or actions is None:
            return template  # their own errors are already reported
        grant = Grant.model_construct(bucket=bucket, prefix=template, actions=actions)
        _check_budget((grant,), info.data, "shorten the prefix")
        return template

    @pydantic.field_validator("listed_grants")
    @classmethod
    def _check_grants(
        cls, grants: tuple[Grant, ...] | None, info: pydantic.ValidationInfo
    ) -> tuple[Grant, ...] | None:
        if grants is None:
            return None
        given = [key for key in ONE_GRANT_KEYS if info.data.get(f"one_{key}") is not None]
        if given:
            raise ValueError(
                f"give bucket, prefix and actions, or grants, not both; "
                f"move {', '.join(given)} into a grant"
            )
        _check_no_overlap(grants, info.data.get("conditions"))
        _check_budget(grants, info.data, "shorten the prefixes or list fewer grants")
        return grants

    def model_post_init(self, context: Any, /) -> None:
        """Gather the grants, however the file gave them."""
        if self.listed_grants is not None:
            self._grants = self.listed_grants
        elif self.one_bucket is not None and self.one_prefix is not None and self.one_actions:
            one = Grant.model_construct(
                bucket=self.one_bucket, prefix=self.one_prefix, actions=self.one_actions
            )
            self._grants = (one,)

    @property
    def grants(self) -> tuple[Grant, ...]:
        """Every grant, the primary one first."""
        return self._grants

    @property
    def bucket(self) -> str:
        """The primary grant's bucket."""
        return self._grants[0].bucket

    @property
    def prefix(self) -> str:
        """The primary grant's prefix template."""
        return self._grants[0].prefix

    @property
    def actions(self) -> tuple[str, ...]:
        """The primary grant's actions."""
        return self._grants[0].actions

    @property
    def buckets(self) -> frozenset[str]:
        """Every bucket a grant names."""
        return frozenset(grant.bucket for grant in self._grants)

    @property
    def token_lifetime_seconds(self) -> int:
        """How long a token lives: ``effective_lifetime_seconds``, else ``duration_seconds``."""
        return self.effective_lifetime_seconds or self.duration_seconds

    @functools.cached_property
    def binds_caller(self) -> bool:
        """Whether tokens are bound to the address that asked for them (``source_ip: caller``)."""
        blocks = (self.conditions, *(grant.conditions for grant in self._grants))
        return any(block is not None and block.binds_caller for block in blocks)

    def ram_conditions(self, grant: Grant, caller_ip: str | None) -> tuple[Condition, ...]:
        """The policy's conditions, then ``grant``'s, as RAM conditions."""
        blocks = (self.conditions, grant.conditions)
        return tuple(c for block in blocks if block is not None for c in block.ram(caller_ip))

    @property
    def oss_endpoint(self) -> str:
        """The OSS endpoint host: ``endpoint`` if set, else the region's public one."""
        return self.endpoint or f"oss-{self.region}.aliyuncs.com"

    @pydantic.model_validator(mode="after")
    def _check_federation(self) -> Policy:
        if (self.federation == "oidc") != (self.oidc_provider_arn is not None):
            raise ValueError("federation: oidc and oidc_provider_arn go together")
        return self

    @pydantic.model_validator(mode="after")
    def _check_part_size(self) -> Policy:
        if self.multipart_part_bytes is not None and self.max_object_bytes is None:
            raise ValueError("multipart_part_bytes bounds max_object_bytes: set both or neither")
        return self


def _check_no_overlap(grants: Sequence[Grant], conditions: Conditions | None) -> None:
    """A condition key is set once: for the whole policy, or per grant."""
    if conditions is None:
        return
    for index, grant in enumerate(grants):
        both = set(conditions.given()) & set(grant.conditions.given() if grant.conditions else [])
        if both:
            name = sorted(both)[0]
            raise ValueError(
                f"grants.{index}.conditions.{name} is already set for the whole policy "
                f"(conditions.{name}); set it in one place"
            )


def _check_budget(grants: Sequence[Grant], data: Mapping[str, Any], hint: str) -> None:
    budget = _worst_case(grants, data.get("conditions"), data.get("effective_lifetime_seconds"))
    if budget.total > MAX_POLICY_CHARS:
        raise ValueError(
            f"rendered policy would be {budget.total} characters, over STS's 2,048 limit "
            f"(with {MAX_VALUE_CHARS}-character variable values); {hint}"
        )


def _worst_case(
    grants: Sequence[Grant], conditions: Conditions | None, lifetime: int | None
) -> Budget:
    """The budget with every variable 64 characters long and the longest caller address."""
    ram_grants = []
    for grant in grants:
        blocks = (conditions, grant.conditions)
        found = [c for block in blocks if block is not None for c in block.ram(_WORST_CASE_ADDRESS)]
        prefix = fill_template(parse_template(grant.prefix), _WORST_CASE_VALUE)
        ram_grants.append(RamGrant(grant.bucket, prefix, grant.actions, conditions=tuple(found)))
    return measure(ram_grants, deadline=lifetime is not None)


def worst_case_budget(policy: Policy) -> Budget:
    """What ``policy`` may take of STS's 2,048 characters, for any caller (64-character values)."""
    return _worst_case(policy.grants, policy.conditions, policy.effective_lifetime_seconds)


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
        templates = (grant.prefix for policy in ordered.values() for grant in policy.grants)
        used = frozenset().union(*(claim_names(template) for template in templates))
        object.__setattr__(self, "_claim_names", used)
        object.__setattr__(self, "digest", hashlib.sha256(canonical.encode()).hexdigest())

    def get(self, name: str) -> Policy | None:
        """The policy called ``name``, if any."""
        return self.policies.get(name)

    def scope(self, name: str, principal: Principal) -> Scope | None:
        """``principal``'s rendered scope of policy ``name``; ``None`` if absent or not allowed.

        Memoised per set (a reload brings a fresh, empty memo), so the hot path
        renders each caller's policy once (once per address for a policy bound
        to the caller's address); ``TemplateValueRejected`` and a missing
        address (``RequestInvalid``) are not memoised.
        """
        policy = self.policies.get(name)
        claims: tuple[tuple[str, str], ...] = ()
        if principal.claims and self._claim_names:
            used = self._claim_names
            claims = tuple(sorted(i for i in principal.claims.items() if i[0] in used))
        address = principal.source_ip if policy is not None and policy.binds_caller else None
        key = (name, principal.subject, principal.groups, principal.auth_method, claims, address)
        try:
            return self._scopes[key]
        except KeyError:
            pass
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
    """The keys a file may give: fields by their alias (``bucket``, not ``one_bucket``)."""
    return frozenset(info.alias or name for name, info in Policy.model_fields.items()) - {"source"}


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
        problems += format_validation_error(doc, err, Policy)
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
