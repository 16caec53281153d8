"""Shared value types: who is calling, what we ask STS for, what it gave us."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType

from broker.names import format_sts_time

__all__ = [
    "Allowance",
    "AssumeRoleRequest",
    "Clock",
    "Credentials",
    "OidcToken",
    "Principal",
    "system_clock",
]

Clock = Callable[[], float]
"""Returns the current time as epoch seconds; injected so tests can move time."""


def system_clock() -> float:
    """The real wall clock (STS expirations are wall-clock times)."""
    return time.time()


_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True, slots=True)
class Allowance:
    """What a restricted API key may reach (``auth.api_keys[].allow``); ``None``: no limit there."""

    routes: frozenset[str] | None = None
    """Route names (``credentials``, ``presign``, ``post_policy``, ``policies``)."""
    policies: frozenset[str] | None = None
    """Policy names."""

    def allows_route(self, route: str) -> bool:
        """Whether the key may call the route named ``route``."""
        return self.routes is None or route in self.routes

    def allows_policy(self, policy: str) -> bool:
        """Whether the key may name policy ``policy``."""
        return self.policies is None or policy in self.policies


@dataclass(frozen=True, slots=True)
class OidcToken:
    """A JWT caller's own verified bearer token, kept for AssumeRoleWithOIDC; never shown."""

    token: str = field(repr=False)
    issuer: str
    expires_at: float
    """The token's ``exp`` (epoch seconds): STS credentials got with it never outlive it."""


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    ``subject`` becomes ``${subject}`` in policy templates, ``groups`` feed
    ``group:NAME`` caller rules and ``${group}``, ``claims`` feed
    ``${claim:NAME}``.  Every value here has passed the safe-value check
    before it can reach a rendered policy.  ``allow`` narrows what a
    restricted API key may reach; ``None`` means no restriction.
    """

    subject: str
    groups: tuple[str, ...] = ()
    auth_method: str = "api_key"
    claims: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    allow: Allowance | None = None
    oidc_token: OidcToken | None = field(default=None, repr=False, compare=False)
    """JWT callers only: their token, for ``federation: oidc`` policies."""


@dataclass(frozen=True, slots=True)
class AssumeRoleRequest:
    """Everything that shapes one set of STS credentials (and so the cache key)."""

    role_arn: str
    policy: str
    duration_seconds: int
    role_session_name: str
    external_id: str | None = None
    oidc_provider_arn: str | None = None
    """Set with ``federation``: the RAM OIDC provider named in AssumeRoleWithOIDC."""
    federation: str | None = None
    """``oidc <provider ARN> <issuer> <subject>`` when the caller's own token goes to STS
    (AssumeRoleWithOIDC): part of the cache key, so two users never share credentials."""
    oidc_token: OidcToken | None = field(default=None, repr=False, compare=False)
    """The token sent as ``OIDCToken`` (not part of the key: the user is)."""
    min_expires_at: float = field(default=0.0, compare=False)
    """Credentials from a shared cache must not expire before this (not part of the key)."""

    def __post_init__(self) -> None:
        if not self.policy:
            # Without Policy the token carries all of the role's permissions.
            raise ValueError("AssumeRoleRequest requires a non-empty inline policy")


@dataclass(frozen=True, slots=True)
class Credentials:
    """Temporary STS credentials; the secret parts never appear in a repr."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expiration: datetime
    expires_at: float = field(init=False, repr=False, compare=False)
    """Expiration as epoch seconds."""
    _expiration_text: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.expiration.tzinfo is None:
            raise ValueError("expiration must be timezone-aware")
        object.__setattr__(self, "expires_at", self.expiration.timestamp())
        object.__setattr__(self, "_expiration_text", format_sts_time(self.expiration))

    def expiration_iso(self) -> str:
        """Expiration in the STS wire format, ``2026-11-21T05:00:00Z``."""
        return self._expiration_text
