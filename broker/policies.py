"""Policy files → validated ``PolicySet``; a caller's scope → minified RAM inline policy."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal

import pydantic
from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, StrictInt, StrictStr
from pydantic.json_schema import SkipJsonSchema

from broker.errors import ConfigError, TemplateValueRejected
from broker.models import Principal
from broker.yamldoc import YamlDocument, format_validation_error, load_yaml

__all__ = [
    "MAX_POLICY_CHARS",
    "SAFE_VALUE_PATTERN",
    "Policy",
    "PolicySet",
    "Scope",
    "check_template_value",
    "load_policies",
    "load_policy_file",
    "may_use",
    "render_policy",
    "render_prefix",
    "scope_for",
]

MAX_POLICY_CHARS = 2048
_MAX_MEMO_SCOPES = 200_000
"""STS rejects an AssumeRole ``Policy`` longer than this."""

SAFE_VALUE_PATTERN: re.Pattern[str] = re.compile(r"^(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9._@-]{0,63}\Z")
"""A value that may stand in for a template variable: one path segment, no wildcard."""

_MAX_VALUE_CHARS = 64
_WORST_CASE_VALUE = "a" * _MAX_VALUE_CHARS

# Bare caller ids name API-key (or mTLS) callers from the config.  A JWT's
# subject is chosen by the identity provider, so it never matches a bare id:
# a browser user whose ``sub`` is "svc-reports" must not get that service's policies.
_ID_AUTH_METHODS = frozenset({"api_key", "mtls"})

_Action = Literal["put", "multipart", "get", "list", "delete"]

# Object actions share one statement on ``<bucket>/<prefix>*``, in this order.
# InitiateMultipartUpload, UploadPart and CompleteMultipartUpload are all
# authorised by oss:PutObject in RAM.
_OBJECT_ACTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "put": ("oss:PutObject",),
        "multipart": ("oss:PutObject", "oss:AbortMultipartUpload", "oss:ListParts"),
        "get": ("oss:GetObject",),
        "delete": ("oss:DeleteObject",),
    }
)


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


_ID_CHARS = "A-Z a-z 0-9 . _ @ -"
_Name = Annotated[
    StrictStr,
    _matching(r"[a-z0-9][a-z0-9-]{0,62}", "use 1-63 of a-z 0-9 -, starting with a letter or digit"),
]
_RoleArn = Annotated[
    StrictStr,
    _matching(r"acs:ram::[0-9]+:role/[A-Za-z0-9.@_-]{1,64}", "use acs:ram::<account>:role/<name>"),
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
_Caller = Annotated[
    StrictStr,
    _matching(
        r"(group:)?[A-Za-z0-9][A-Za-z0-9._@-]{0,63}",
        f"use an id or group:NAME, 1-64 of {_ID_CHARS}",
    ),
]
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
    source: SkipJsonSchema[str] = Field(default="", exclude=True)
    """The file this policy came from; set by the loader, never read from the file."""

    @property
    def oss_endpoint(self) -> str:
        """The OSS endpoint host: ``endpoint`` if set, else the region's public one."""
        return self.endpoint or f"oss-{self.region}.aliyuncs.com"

    @pydantic.field_validator("prefix")
    @classmethod
    def _check_prefix(cls, template: str, info: pydantic.ValidationInfo) -> str:
        segments = _parse_template(template)
        bucket, actions = info.data.get("bucket"), info.data.get("actions")
        if bucket is None or actions is None:
            return template  # their own errors are already reported
        worst = _dumps(_document(bucket, actions, _fill(segments, _WORST_CASE_VALUE)))
        if len(worst) > MAX_POLICY_CHARS:
            raise ValueError(
                f"rendered policy would be {len(worst)} characters, over STS's 2,048 limit "
                f"(with {_MAX_VALUE_CHARS}-character variable values); shorten the prefix"
            )
        return template


# --- prefix templates ---

_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_VARIABLE_NAME = re.compile(r"subject|group|claim:[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_STATIC_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@=+-")
_RENDERED_PREFIX = re.compile(r"(?:[A-Za-z0-9._@=+-]+/)+\Z")

_Segment = tuple[str, str | None]
"""One path segment of a template: its static text, then at most one variable at its end."""


@lru_cache(maxsize=1024)
def _parse_template(template: str) -> tuple[_Segment, ...]:
    """Split a prefix template into segments, or raise ``ValueError`` saying why it is unsafe."""
    if not template:
        raise ValueError('must not be empty; use a path such as "uploads/${subject}/"')
    if "*" in template or "?" in template:
        raise ValueError("must not contain * or ?: RAM treats them as wildcards, with no escape")
    if template.startswith("/"):
        raise ValueError("must not start with / (OSS keys have no leading slash)")
    if not template.endswith("/"):
        raise ValueError("must end with / so that user1/ can never match the start of user10/")
    return tuple(_parse_segment(segment) for segment in template[:-1].split("/"))


def _parse_segment(segment: str) -> _Segment:
    # A variable may never widen scope: it must END a segment, and a segment
    # holds at most one, so two distinct values always give two prefixes of
    # which neither is the start of the other ("a/" vs "ab/", never "a" vs "ab").
    if not segment:
        raise ValueError("must not contain an empty path segment (//)")
    if segment in {".", ".."}:
        raise ValueError("must not contain a . or .. path segment")
    found = list(_VARIABLE.finditer(segment))
    for match in found:
        if _VARIABLE_NAME.fullmatch(match.group(1)) is None:
            raise ValueError(
                f"variable {match.group(0)} is not defined; "
                "use ${subject}, ${group} or ${claim:NAME}"
            )
    if len(found) > 1:
        raise ValueError(f"path segment {segment!r} holds more than one variable; allowed: one")
    static, variable = segment, None
    if found:
        if found[0].end() != len(segment):
            raise ValueError(
                f"variable {found[0].group(0)} must end its path segment (be followed by /)"
            )
        static, variable = segment[: found[0].start()], found[0].group(1)
    if set("${}") & set(static):
        raise ValueError("has a malformed variable; write ${subject}, ${group} or ${claim:NAME}")
    for char in static:
        if char not in _STATIC_CHARS:
            raise ValueError(
                f"character {char!r} is not allowed; "
                "static text may use A-Z a-z 0-9 . _ @ = + - and /, and ${...} variables"
            )
    if ".." in static:
        raise ValueError("must not contain ..")
    return static, variable


def _fill(segments: tuple[_Segment, ...], value: str) -> str:
    return "".join(f"{static}{value if variable else ''}/" for static, variable in segments)


def check_template_value(value: str) -> str:
    """``value`` if it is safe as one path segment, else ``ValueError`` (never naming it).

    A template variable may never widen the scope: RAM has no escape for
    ``*`` and ``?``, and ``/`` or ``..`` would leave the caller's segment.
    """
    if not isinstance(value, str):
        raise ValueError("template value must be a string")
    if not value:
        raise ValueError("template value must not be empty")
    if len(value) > _MAX_VALUE_CHARS:
        raise ValueError(f"template value must be at most {_MAX_VALUE_CHARS} characters")
    if ".." in value:
        raise ValueError("template value must not contain two dots in a row")
    if SAFE_VALUE_PATTERN.match(value) is None:
        raise ValueError(
            "template value must start with a letter or digit and contain only A-Z a-z 0-9 . _ @ -"
        )
    return value


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
    for static, variable in _parse_template(policy.prefix):
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


# --- rendering ---


def _document(bucket: str, actions: Iterable[str], prefix: str) -> dict[str, Any]:
    """The RAM policy (grammar Version "1") as data; serialised by ``_dumps`` only."""
    wanted = set(actions)
    object_actions = dict.fromkeys(
        ram for name, mapped in _OBJECT_ACTIONS.items() if name in wanted for ram in mapped
    )
    statements: list[dict[str, Any]] = []
    if object_actions:
        resource = f"acs:oss:*:*:{bucket}/{prefix}*"
        statements.append({"Effect": "Allow", "Action": [*object_actions], "Resource": [resource]})
    if "list" in wanted:
        only_prefix = {"StringLike": {"oss:Prefix": [f"{prefix}*"]}}
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["oss:ListObjects"],
                "Resource": [f"acs:oss:*:*:{bucket}"],
                "Condition": only_prefix,
            }
        )
    return {"Version": "1", "Statement": statements}


def _dumps(document: Mapping[str, Any]) -> str:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=True)


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
    document = _dumps(_document(policy.bucket, policy.actions, prefix))
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
        canonical = _dumps({"policies": [p.model_dump(mode="json") for p in ordered.values()]})
        object.__setattr__(self, "policies", MappingProxyType(ordered))
        # Only claims a prefix uses key the scope memo (not jti, nonce, ...).
        used = {m for p in ordered.values() for m in re.findall(r"\$\{claim:([^}]*)\}", p.prefix)}
        object.__setattr__(self, "_claim_names", frozenset(used))
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
        line = doc.line_of((str(key),))
        if key == "source":
            problem = "is set by the broker from the file's path; remove it"
        else:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            problem = f"unknown key{hint}; allowed keys: {', '.join(sorted(allowed))}"
        problems.append(f"{doc.path}:{line}: {key}: {problem}")
    return problems


def load_policy_file(path: Path) -> Policy:
    """Read and validate one policy file; ``ConfigError`` lists every problem as file:line: key."""
    return _load_file(path)[0]


def _load_file(path: Path) -> tuple[Policy, YamlDocument]:
    try:
        doc = load_yaml(path)
    except ValueError as err:
        raise ConfigError([str(err)]) from err
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
    problems: list[str] = []
    policies: dict[str, Policy] = {}
    for path in paths:
        try:
            policy, doc = _load_file(path)
        except ConfigError as err:
            problems += err.problems
            continue
        first = policies.get(policy.name)
        if first is not None:
            line = doc.line_of(("name",))
            problems.append(
                f"{path}:{line}: name: policy {policy.name!r} is already defined in "
                f"{first.source}; policy names must be unique"
            )
            continue
        policies[policy.name] = policy
    if problems:
        raise ConfigError(problems)
    return PolicySet(policies)
