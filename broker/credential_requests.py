"""A caller's token under a scope: what it is cached as, and what STS is asked for it.

The hot path looks a token up by ``cache_key`` alone; ``assume_request`` is
built only when STS may be called.  A plain request (no ``min_ttl_seconds``,
no narrowing) of a configured caller resolves the same way every time under
one configuration: ``keep_target`` remembers its scope, endpoint and key, and
``known_target`` gives them back while they hold.  ``CacheKey.for_request(assume_request(...))``
equals ``cache_key(...)`` by construction: the request is made from the key.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from broker import request_context
from broker.auth import role_session_name
from broker.credentials.cache import CacheKey
from broker.errors import AccessDenied, AuthenticationFailed, BrokerError
from broker.models import AssumeRoleRequest, Principal
from broker.policies import Policy, PolicySet, Scope
from broker.services import Services
from broker.signing import OssEndpoint

__all__ = ["Target", "assume_request", "cache_key", "keep_target", "kept_target", "known_target"]


def cache_key(principal: Principal, scope: Scope, now: float, *, refresh_margin: int) -> CacheKey:
    """What the token for ``principal`` under ``scope`` is cached as (the Policy by digest).

    With ``federation: oidc`` the key names the provider, the token's issuer and
    the subject, so two users never share credentials and one user's concurrent
    misses share one call.  A token about to expire (within ``refresh_margin``
    of ``now``) is refused here (401): STS must not get it.
    """
    policy = scope.policy
    # A function of the scope alone, built once per scope the policy set keeps
    # (a narrowed scope is new for every request: nothing to gain from keeping it).
    kept = policy.federation != "oidc" and not scope.narrowed
    if kept:
        found = _KEYS.get((id(scope), refresh_margin))
        if found is not None and found[0] is scope:
            return found[1]
    key = CacheKey(
        role_arn=policy.role_arn,
        policy_digest=scope.digest,
        duration_seconds=policy.duration_seconds,
        external_id=policy.external_id,
        role_session_name=role_session_name(principal),
        effective_lifetime_seconds=_effective_lifetime(policy, refresh_margin),
        federation=_federation(principal, policy, now, refresh_margin),
    )
    if kept:
        if len(_KEYS) >= _MAX_KEYS:
            _KEYS.clear()
        _KEYS[(id(scope), refresh_margin)] = (scope, key)
    return key


_KEYS: dict[tuple[int, int], tuple[Scope, CacheKey]] = {}
"""``cache_key`` memo: a scope (one caller's rendering of a policy, memoised by the
policy set) always has the same key; the scope is held so a reused id cannot alias."""
_MAX_KEYS = 16_384


def assume_request(principal: Principal, scope: Scope, key: CacheKey) -> AssumeRoleRequest:
    """What to ask STS for the token cached as ``key``: always with the Policy."""
    assume = AssumeRoleRequest(
        role_arn=key.role_arn,
        policy=scope.document,
        duration_seconds=key.duration_seconds,
        role_session_name=key.role_session_name,
        external_id=key.external_id,
        effective_lifetime_seconds=key.effective_lifetime_seconds,
    )
    if key.federation is None:
        return assume
    return dataclasses.replace(
        assume,
        oidc_provider_arn=scope.policy.oidc_provider_arn,
        federation=key.federation,
        oidc_token=principal.oidc_token,
    )


def _federation(principal: Principal, policy: Policy, now: float, margin: int) -> str | None:
    """Whose own token the credentials come from (``federation: oidc``), else ``None``."""
    if policy.federation != "oidc":
        return None
    token = principal.oidc_token
    if principal.auth_method != "jwt" or token is None:
        raise AccessDenied(f"policy {policy.name} is federated: only OIDC (JWT) callers may use it")
    if token.expires_at - now <= margin:
        raise AuthenticationFailed("the bearer token expires too soon; get a fresh one")
    return f"oidc {policy.oidc_provider_arn} {token.issuer} {principal.subject}"


def _effective_lifetime(policy: Policy, margin: int) -> int | None:
    """The policy's effective lifetime, which the deadline is rendered from when STS is called."""
    lifetime = policy.effective_lifetime_seconds
    if lifetime is not None and lifetime <= margin:
        # No token could ever be served (sts-broker check --config refuses this).
        raise BrokerError(
            f"policy {policy.name}: effective_lifetime_seconds ({lifetime}) must exceed "
            f"cache.refresh_margin_seconds ({margin})"
        )
    return lifetime


@dataclass(frozen=True, slots=True)
class Target:
    """What a caller's plain request for a policy resolves to, under one configuration."""

    principal: Principal
    policies: PolicySet
    settings: object
    scope: Scope
    endpoint: OssEndpoint
    key: CacheKey
    min_ttl: int


_TARGETS: dict[tuple[int, str], Target] = {}
"""Plain credential requests (no query) already resolved, by caller object and policy name.

The caller object is the one ``broker.http.admissions`` hands out for an API
key (JWT callers are new objects per request and are not kept); an entry
holds while the policy set and settings are the very objects it was resolved
under (both are swapped whole on reload).  Holds no secret; bounded."""
_MAX_TARGETS = 4096


def known_target(services: Services, principal: Principal, name: str) -> Target | None:
    """How a plain request by ``principal`` for policy ``name`` resolved before, if it holds."""
    found = kept_target(services, principal, name)
    if found is not None:
        request_context.note_policy(name)  # as usable_scope would
    return found


def kept_target(services: Services, principal: Principal, name: str) -> Target | None:
    """``known_target``, without noting the policy in the request context."""
    found = _TARGETS.get((id(principal), name))
    if (
        found is None
        or found.principal is not principal
        or found.policies is not services.policies
        or found.settings is not services.settings
    ):
        return None
    return found


def keep_target(
    services: Services, principal: Principal, name: str, scope: Scope, endpoint: OssEndpoint
) -> None:
    """Remember how a plain request resolved (not for JWT callers nor federated policies)."""
    policy = scope.policy
    if principal.auth_method == "jwt" or policy.federation == "oidc":
        return
    margin = services.settings.cache.refresh_margin_seconds
    key = cache_key(principal, scope, services.clock(), refresh_margin=margin)
    min_ttl = min(0, policy.token_lifetime_seconds - margin)
    if len(_TARGETS) >= _MAX_TARGETS:
        _TARGETS.clear()
    target = Target(principal, services.policies, services.settings, scope, endpoint, key, min_ttl)
    _TARGETS[(id(principal), name)] = target
