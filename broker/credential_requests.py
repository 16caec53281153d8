"""A caller's token under a scope: what it is cached as, and what STS is asked for it.

The hot path looks a token up by ``cache_key`` alone; ``assume_request`` is
built only when STS may be called.  ``CacheKey.for_request(assume_request(...))``
equals ``cache_key(...)`` by construction: the request is made from the key.
"""

from __future__ import annotations

import dataclasses

from broker.auth import role_session_name
from broker.credentials.cache import CacheKey
from broker.errors import AccessDenied, AuthenticationFailed, BrokerError
from broker.models import AssumeRoleRequest, Principal
from broker.policies import Policy, Scope

__all__ = ["assume_request", "cache_key"]


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
