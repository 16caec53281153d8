"""A caller's scope of a policy: its rendered grants, the exact STS Policy, and narrowing.

Rendering fills each grant's prefix template with the caller's values (each
checked by ``broker.templates``: a value can never widen the scope) and adds
the policy's conditions, with the caller's own address where a policy binds
tokens to it (``source_ip: caller``).

A request may ask for less (``Narrowing``: one bucket, a sub-prefix, one key,
fewer actions) and never for more: a narrowed grant's prefix or key starts
with the grant's rendered prefix, its actions are a subset of the grant's and
its conditions are the grant's, so what a narrowed token may do is always
inside what the un-narrowed one may (tests/test_scopes.py checks it with
hypothesis and the emulator's RAM evaluator).  Anything outside is refused,
naming what.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from broker.errors import AccessDenied, BucketAmbiguous, RequestInvalid, TemplateValueRejected
from broker.models import Principal
from broker.ram import MAX_POLICY_CHARS, Budget, RamGrant, measure, oss_policy_document
from broker.templates import check_template_value, parse_template

if TYPE_CHECKING:
    from broker.policies import Policy
    from broker.policy_fields import Grant

__all__ = [
    "ACTIONS_PATTERN",
    "ACTION_NAMES",
    "BUCKET_PATTERN",
    "KEY_PATTERN",
    "MAX_KEY_CHARS",
    "NARROWING_PARAMETERS",
    "PREFIX_PATTERN",
    "SAFE_PATH_RULE",
    "Narrowing",
    "Scope",
    "grant_to_sign",
    "narrow",
    "parse_narrowing",
    "render_policy",
    "render_prefix",
    "scope_for",
]

NARROWING_PARAMETERS = ("bucket", "prefix", "key", "actions")
"""The query parameters of ``GET /v1/credentials/{policy}`` that narrow a token."""

ACTION_NAMES = ("put", "multipart", "get", "list", "delete")

SAFE_PATH_RULE = "path segments of A-Z a-z 0-9 . _ @ = + -, without '..'"
"""What a rendered prefix, and a narrowing prefix or key, may contain."""

MAX_KEY_CHARS = 1023
"""The longest narrowing prefix or key: OSS's longest object key (in bytes; ASCII here)."""

# Pattern bodies (no anchors), shared with the OpenAPI document.
_SEGMENT = r"[A-Za-z0-9._@=+-]+"
PREFIX_PATTERN = rf"(?:{_SEGMENT}/)+"
KEY_PATTERN = rf"(?:{_SEGMENT}/)*{_SEGMENT}"
BUCKET_PATTERN = r"[a-z0-9][a-z0-9-]{1,61}[a-z0-9]"
_ACTION = "(?:" + "|".join(ACTION_NAMES) + ")"
ACTIONS_PATTERN = rf"{_ACTION}(?:,{_ACTION})*"

_RENDERED_PREFIX = re.compile(rf"{PREFIX_PATTERN}\Z")
_KEY = re.compile(rf"{KEY_PATTERN}\Z")
_BUCKET = re.compile(rf"{BUCKET_PATTERN}\Z")


@dataclass(frozen=True, slots=True)
class Scope:
    """What one caller may do under one policy: its rendered grants and the exact STS Policy.

    ``document`` is what AssumeRole sends (before the ``acs:CurrentTime``
    deadline of ``effective_lifetime_seconds``, added when STS is called); the
    cache key follows it, so a narrowed or address-bound scope has its own.
    """

    policy: Policy
    grants: tuple[RamGrant, ...]
    document: str
    digest: str
    """sha256 hex of ``document``; log this, not the document."""
    narrowed: bool = False

    @property
    def prefix(self) -> str:
        """The primary (first) grant's rendered prefix."""
        return self.grants[0].prefix

    @property
    def bucket(self) -> str:
        """The primary grant's bucket."""
        return self.grants[0].bucket

    @property
    def key(self) -> str | None:
        """The one object the primary grant was narrowed to, if it was."""
        return self.grants[0].key

    @property
    def budget(self) -> Budget:
        """The characters of the Policy STS receives, deadline included, per grant."""
        return measure(self.grants, deadline=self.policy.effective_lifetime_seconds is not None)

    def grant_for(self, key: str, bucket: str | None = None) -> RamGrant | None:
        """The first grant covering object ``key`` (in ``bucket``, if given), if any."""
        for grant in self.grants:
            if (bucket is None or grant.bucket == bucket) and _holds(grant, key):
                return grant
        return None


@dataclass(frozen=True, slots=True)
class Narrowing:
    """What a request asks for instead of its whole scope; ``None``: not narrowed there."""

    bucket: str | None = None
    prefix: str | None = None
    key: str | None = None
    actions: tuple[str, ...] | None = None


# --- rendering ---


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


def render_prefix(policy: Policy, principal: Principal, template: str | None = None) -> str:
    """The caller's concrete prefix of ``template`` (the primary grant's), e.g. ``avatars/alice/``.

    Raises ``TemplateValueRejected`` naming only the variable when a value is
    missing or unsafe: the value is never rendered, and there is no fallback.
    """
    parts: list[str] = []
    for static, variable in parse_template(policy.prefix if template is None else template):
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


def _check_prefix(prefix: str) -> str:
    if _RENDERED_PREFIX.match(prefix) is None or ".." in prefix:
        raise ValueError(f"prefix must be non-empty {SAFE_PATH_RULE}, each ending in /")
    return prefix


def render_policy(policy: Policy, prefix: str) -> str:
    """The minified inline policy of a one-grant ``policy`` for ``prefix`` (already rendered).

    Never call AssumeRole without a Policy: without one, the token carries
    every permission of the role.  So an empty or oversized document is an
    error here, never something to send without.  Policies with several
    grants, or bound to the caller's address, are rendered by ``scope_for``.
    """
    _check_prefix(prefix)
    if len(policy.grants) != 1:
        raise ValueError(f"policy {policy.name} has several grants; render it with scope_for")
    grant = policy.grants[0]
    conditions = policy.ram_conditions(grant, None)
    document = oss_policy_document(
        [RamGrant(grant.bucket, prefix, grant.actions, None, conditions)]
    )
    if len(document) > MAX_POLICY_CHARS:
        raise ValueError(
            f"rendered policy is {len(document)} characters, over STS's {MAX_POLICY_CHARS} limit"
        )
    return document


def scope_for(policy: Policy, principal: Principal) -> Scope:
    """Render ``policy`` for ``principal``.

    ``TemplateValueRejected`` if a value cannot be rendered; ``RequestInvalid``
    if the policy binds tokens to the caller's address and there is none.
    """
    caller_ip = _caller_ip(policy, principal)
    grants = tuple(_render_grant(policy, grant, principal, caller_ip) for grant in policy.grants)
    return _scope(policy, grants, narrowed=False)


def _render_grant(
    policy: Policy, grant: Grant, principal: Principal, caller_ip: str | None
) -> RamGrant:
    prefix = _check_prefix(render_prefix(policy, principal, grant.prefix))
    conditions = policy.ram_conditions(grant, caller_ip)
    return RamGrant(grant.bucket, prefix, grant.actions, None, conditions)


def _caller_ip(policy: Policy, principal: Principal) -> str | None:
    """The address to bind tokens to, for a policy with ``source_ip: caller``."""
    if not policy.binds_caller:
        return None
    try:
        address = ipaddress.ip_address(principal.source_ip or "")
    except ValueError:
        raise RequestInvalid(
            f"policy {policy.name} binds its tokens to the caller's address, and this "
            "request's address is unknown (behind a proxy not listed in listen.trusted_proxies?)"
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)  # as RAM sees an IPv4 client
    return str(address)


def _scope(policy: Policy, grants: tuple[RamGrant, ...], *, narrowed: bool) -> Scope:
    document = oss_policy_document(grants)
    size = measure(grants, deadline=policy.effective_lifetime_seconds is not None).total
    if size > MAX_POLICY_CHARS:
        raise RequestInvalid(
            f"the policy for STS would be {size} characters, over its {MAX_POLICY_CHARS} "
            "limit; narrow to a shorter prefix or key"
        )
    digest = hashlib.sha256(document.encode()).hexdigest()
    return Scope(policy, grants, document, digest, narrowed)


# --- narrowing ---


def parse_narrowing(query: Mapping[str, Sequence[str]]) -> Narrowing | None:
    """The narrowing a request's query asks for (``NARROWING_PARAMETERS``), or None.

    ``RequestInvalid`` for a malformed value (never echoed) or one given twice.
    """
    given: dict[str, str] = {}
    for name in NARROWING_PARAMETERS:
        values = query.get(name, ())
        if len(values) > 1:
            raise RequestInvalid(f"give {name} at most once")
        if values:
            given[name] = values[0]
    if not given:
        return None
    if "prefix" in given and "key" in given:
        raise RequestInvalid("give prefix or key, not both (a key names one object already)")
    narrowing = Narrowing(
        bucket=_parsed(given, "bucket", _BUCKET, "an OSS bucket name (3-63 of a-z 0-9 -)"),
        prefix=_parsed(given, "prefix", _RENDERED_PREFIX, f"{SAFE_PATH_RULE}, each ending in /"),
        key=_parsed(given, "key", _KEY, f"{SAFE_PATH_RULE}, not ending in /"),
        actions=_parsed_actions(given.get("actions")),
    )
    if narrowing.key is not None and narrowing.actions is not None and "list" in narrowing.actions:
        raise RequestInvalid("a token for one key cannot list; leave list out, or give a prefix")
    return narrowing


def _parsed(given: Mapping[str, str], name: str, pattern: re.Pattern[str], rule: str) -> str | None:
    value = given.get(name)
    if value is None:
        return None
    if len(value) > MAX_KEY_CHARS or pattern.match(value) is None or ".." in value:
        raise RequestInvalid(f"{name} must be {rule}")
    return value


def _parsed_actions(value: str | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    names = tuple(value.split(","))
    if not all(name in ACTION_NAMES for name in names):
        raise RequestInvalid(f"actions must be a comma-separated list of {', '.join(ACTION_NAMES)}")
    if len(set(names)) != len(names):
        raise RequestInvalid("actions lists an action twice")
    return names


def narrow(scope: Scope, narrowing: Narrowing) -> Scope:
    """``scope`` cut down to ``narrowing``; ``AccessDenied`` naming what lies outside it."""
    grants = list(scope.grants)
    name = scope.policy.name
    if narrowing.bucket is not None:
        grants = [grant for grant in grants if grant.bucket == narrowing.bucket]
        if not grants:
            raise AccessDenied(f"policy {name} grants nothing in bucket {narrowing.bucket}")
    if narrowing.prefix is not None:
        grants = _within(grants, narrowing.prefix, "prefix", name)
    if narrowing.key is not None:
        grants = _within(grants, narrowing.key, "key", name)
    if narrowing.actions is not None:
        grants = _only(grants, narrowing.actions, name)
    return _scope(scope.policy, tuple(grants), narrowed=True)


def _within(grants: Sequence[RamGrant], path: str, what: str, name: str) -> list[RamGrant]:
    """The grants whose prefix holds ``path``, cut to it: a sub-prefix, or one key."""
    kept = []
    for grant in grants:
        if not path.startswith(grant.prefix):
            continue
        if what == "prefix":
            kept.append(replace(grant, prefix=path))
            continue
        actions = tuple(action for action in grant.actions if action != "list")
        if actions:
            kept.append(replace(grant, key=path, actions=actions))
    if not kept:
        allowed = ", ".join(sorted({grant.prefix for grant in grants}))
        raise AccessDenied(
            f"{what} {path} is outside this caller's scope of policy {name} (allowed: {allowed})"
        )
    return kept


def _only(grants: Iterable[RamGrant], wanted: tuple[str, ...], name: str) -> list[RamGrant]:
    """The grants with only the ``wanted`` actions; every one wanted must be granted."""
    grants = list(grants)
    granted = {action for grant in grants for action in grant.actions}
    missing = [action for action in wanted if action not in granted]
    if missing:
        raise AccessDenied(f"policy {name} does not grant {', '.join(missing)} there")
    kept = [replace(g, actions=tuple(a for a in g.actions if a in wanted)) for g in grants]
    return [grant for grant in kept if grant.actions]


# --- signing: the grant a presigned URL or post policy is signed under ---


def grant_to_sign(scope: Scope, path: str, action: str, bucket: str | None, doing: str) -> RamGrant:
    """The grant of ``scope`` holding ``path`` (a key or key prefix) that allows ``action``.

    ``bucket`` picks the grant's bucket; without it, the one bucket all grants
    share (``BucketAmbiguous``, listing them, when they name several).  A path
    no grant holds is a 403 naming the allowed prefixes; a path whose grants
    do not allow ``action`` is a 403 naming ``doing`` and the grant's prefix.
    """
    grants = scope.grants
    if len(grants) == 1:  # the common one-grant policy: allowed at once, refused as below
        grant = grants[0]
        bucket_ok = bucket is None or bucket == grant.bucket
        if bucket_ok and action in grant.actions and _holds(grant, path):
            return grant
    chosen = _signing_bucket(scope, bucket)
    in_bucket = [grant for grant in scope.grants if grant.bucket == chosen]
    holding = [grant for grant in in_bucket if _holds(grant, path)]
    if not holding:
        places = sorted({grant.key or grant.prefix for grant in in_bucket})
        allowed = ", ".join(places)
        plural = "es" if len(places) > 1 else ""
        raise AccessDenied(f"key is outside this caller's prefix{plural} {allowed}", prefix=allowed)
    for grant in holding:
        if action in grant.actions:
            return grant
    grant = holding[0]
    raise AccessDenied(
        f"policy {scope.policy.name} does not allow {doing} under {chosen}/{grant.prefix} "
        f"(its grant there allows {', '.join(grant.actions)})"
    )


def _signing_bucket(scope: Scope, bucket: str | None) -> str:
    buckets = sorted({grant.bucket for grant in scope.grants})
    if bucket is None:
        if len(buckets) > 1:
            raise BucketAmbiguous(
                f"policy {scope.policy.name} grants several buckets; give bucket: "
                + ", ".join(buckets)
            )
        return buckets[0]
    if bucket not in buckets:
        raise AccessDenied(f"policy {scope.policy.name} grants nothing in bucket {bucket}")
    return bucket


def _holds(grant: RamGrant, path: str) -> bool:
    return path == grant.key if grant.key is not None else path.startswith(grant.prefix)
