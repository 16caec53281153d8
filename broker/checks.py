"""Warnings from ``sts-broker check`` about files that are valid but will not work well.

* **Lifetimes too short for credential providers.**  The official credentials
  libraries treat a token as stale 15 minutes before it expires and fetch a
  new one on the next SDK call once it is:
  ``alibabacloud_credentials/provider/uri.py`` ``_get_stale_time`` returns
  ``expiration - 15 * 60``; ``@alicloud/credentials``
  ``dist/src/providers/session.js`` has ``STALE_TIME = 15 * 60``, which
  ``providers/uri.js`` uses.  The broker hands out a cached token until less
  than ``cache.refresh_fraction`` of its lifetime is left, so a provider may
  receive a token with only ``duration_seconds * refresh_fraction`` left.  To
  leave it 15 minutes of use, a policy it fetches needs ``duration_seconds``
  of at least ``(900 + 900) / refresh_fraction`` (3600 with the defaults);
  with 900 s every SDK call fetches again.  With ``effective_lifetime_seconds``
  the token's ``Expiration`` is its ``acs:CurrentTime`` deadline
  (``broker.credentials.deadline``), so that lifetime is the one compared,
  and the one a warning names.
* **Which policies are served to credential providers**: those an API key
  can fetch credentials for, i.e. whose ``callers`` name the key's id or one
  of its groups, unless the key's ``allow`` excludes the ``credentials`` route
  or the policy.  A provider sends nothing but a fixed URL (``?access_token=``),
  so a browser's expiring JWT or an mTLS certificate never reaches the broker
  through one.  Without a config, the API keys' groups are unknown: only bare
  caller ids count.
* **Restrictions that can never match**: an ``allow.policies`` entry naming
  no loaded policy, or a policy whose ``callers`` do not include the key.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from broker.auth import allowance
from broker.config import ApiKeySettings, CacheSettings, Settings
from broker.errors import ConfigError
from broker.models import Principal
from broker.policies import Policy, PolicySet, may_use
from broker.yamldoc import load_yaml

__all__ = [
    "PROVIDER_STALE_SECONDS",
    "allow_warnings",
    "minimum_provider_duration",
    "provider_lifetime_warnings",
    "providers_of",
    "unchecked_group_policies",
]

PROVIDER_STALE_SECONDS = 15 * 60
"""How long before expiry the official credential providers fetch a new token (see above)."""
_PROVIDER_USE_SECONDS = 15 * 60
"""How long a provider should be able to use each token it fetches, at the least."""
_DEFAULT_REFRESH_FRACTION = CacheSettings().refresh_fraction


def minimum_provider_duration(refresh_fraction: float = _DEFAULT_REFRESH_FRACTION) -> int:
    """The shortest ``duration_seconds`` that leaves a provider 15 minutes per token."""
    return math.ceil((PROVIDER_STALE_SECONDS + _PROVIDER_USE_SECONDS) / refresh_fraction)


def providers_of(policy: Policy, api_keys: Sequence[ApiKeySettings] | None) -> list[str]:
    """The API keys that can fetch ``policy``'s credentials (with no config: bare caller ids)."""
    if api_keys is None:
        return [caller for caller in policy.callers if not caller.startswith("group:")]
    found = []
    for key in api_keys:
        allow = allowance(key.allow)
        if allow is not None and not (
            allow.allows_route("credentials") and allow.allows_policy(policy.name)
        ):
            continue
        if may_use(policy, Principal(subject=key.id, groups=key.groups)):
            found.append(key.id)
    return found


def provider_lifetime_warnings(
    policies: Iterable[Policy], settings: Settings | None = None
) -> list[str]:
    """``file:line: warning:`` for each policy served to providers whose tokens are too short."""
    fraction = _DEFAULT_REFRESH_FRACTION if settings is None else settings.cache.refresh_fraction
    minimum = minimum_provider_duration(fraction)
    api_keys = None if settings is None else settings.auth.api_keys
    warnings = []
    for policy in policies:
        if policy.token_lifetime_seconds >= minimum:
            continue
        callers = providers_of(policy, api_keys)
        if callers:
            warnings.append(_short_lifetime(policy, callers, fraction, minimum))
    return warnings


def unchecked_group_policies(policies: Iterable[Policy]) -> list[str]:
    """Short-lived policies with only group callers: not checkable without a config."""
    minimum = minimum_provider_duration()
    return [
        policy.name
        for policy in policies
        if policy.token_lifetime_seconds < minimum
        and all(caller.startswith("group:") for caller in policy.callers)
    ]


def _short_lifetime(policy: Policy, callers: list[str], fraction: float, minimum: int) -> str:
    field, lifetime = _lifetime_field(policy)
    left = round(lifetime * fraction)
    effect = "on every SDK call" if left <= PROVIDER_STALE_SECONDS else "every few minutes"
    who = ", ".join(callers[:3]) + (", ..." if len(callers) > 3 else "")
    fix = f"choose duration_seconds: {minimum} or more"
    if field == "effective_lifetime_seconds":
        fix = f"leave effective_lifetime_seconds out and {fix}"
    return (
        f"{_where(policy.source, (field,))}: warning: {field}: {lifetime} "
        f"is too short for credential providers (API key {who} can fetch this policy): "
        f"alibabacloud-credentials and @alicloud/credentials fetch a new token "
        f"{PROVIDER_STALE_SECONDS} s before it expires and may be handed one with {left} s "
        f"left, so they would call the broker {effect}; {fix}, "
        f"or keep this policy for presigned URLs and post policies "
        f"(docs/api.md, Credential providers)"
    )


def _lifetime_field(policy: Policy) -> tuple[str, int]:
    """The field setting how long a token lives, and its value (the effective one if set)."""
    if policy.effective_lifetime_seconds is not None:
        return "effective_lifetime_seconds", policy.effective_lifetime_seconds
    return "duration_seconds", policy.duration_seconds


def allow_warnings(policies: PolicySet, settings: Settings) -> list[str]:
    """``file:line: warning:`` for each ``allow.policies`` entry the key can never use."""
    warnings = []
    for index, key in enumerate(settings.auth.api_keys):
        if key.allow is None or key.allow.policies is None:
            continue
        principal = Principal(subject=key.id, groups=key.groups)
        for position, name in enumerate(key.allow.policies):
            policy = policies.get(name)
            if policy is None:
                problem = f"no policy named {name!r} in {settings.policies_dir}"
            elif not may_use(policy, principal):
                problem = f"policy {name!r} does not list {key.id} or its groups in callers"
            else:
                continue
            loc = ("auth", "api_keys", index, "allow", "policies", position)
            where = _where(str(settings.source or ""), loc)
            dotted = ".".join(str(part) for part in loc)
            warnings.append(f"{where}: warning: {dotted}: {problem}, so this key can never use it")
    return warnings


def _where(source: str, loc: tuple[str | int, ...]) -> str:
    """``file:line`` of ``loc`` in ``source`` (line 1 if the file cannot be read)."""
    if not source:
        return "(config)"
    try:
        line = load_yaml(Path(source)).line_of(loc)
    except ConfigError:  # it loaded a moment ago; a warning's line is not worth failing for
        line = 1
    return f"{source}:{line}"
