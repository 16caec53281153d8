"""The composition root: settings and policies wired into the services requests share."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from broker.auth import (
    Authenticator,
    Revocations,
    api_key_authenticator,
    certificate_authenticator,
)
from broker.config import JwtSettings, Settings
from broker.credentials.budget import RedisTokenBuckets
from broker.credentials.cache import CredentialCache
from broker.credentials.chain import CredentialChain, build_chain
from broker.credentials.sts import SourceCredential, StsClient
from broker.metrics import Metrics
from broker.models import Clock, system_clock
from broker.oidc import JwksSource, JwtVerifier
from broker.policies import PolicySet
from broker.quotas import CallerQuotas, CallerStsQuota, FleetBuckets

__all__ = [
    "Services",
    "build_authenticator",
    "build_services",
    "caller_request_quota",
    "caller_sts_quota",
]


@dataclass(slots=True)
class Services:
    """Everything a request needs.  ``policies`` is swapped whole on reload, never edited."""

    settings: Settings
    policies: PolicySet
    cache: CredentialCache
    authenticator: Authenticator
    sts: StsClient
    clock: Clock
    metrics: Metrics
    quotas: CallerQuotas
    """The request-rate quota (off by default)."""
    sts_quota: CallerStsQuota
    """Each caller's allowance of STS calls it causes."""
    shutting_down: bool = False
    revoked_at_runtime: Revocations = field(default_factory=Revocations)
    """Revoked through the admin channel (or by another replica): kept across reloads."""
    background: set[asyncio.Task[object]] = field(default_factory=set)
    """Purges still running (Redis), held so they are not collected; awaited by tests."""


def build_services(
    settings: Settings,
    policies: PolicySet,
    *,
    credential: SourceCredential | None = None,
    clock: Clock = system_clock,
    process_share: float = 1.0,
) -> Services:
    """Wire settings and policies into the shared services.

    ``process_share`` (``1/N`` for one of ``serve --workers N``) is the part of
    the STS call budget (``credentials.chain.sts_budget``) and of each caller's
    STS allowance this process may spend on its own.  No network I/O happens
    here; with ``cache.backend: redis`` the encryption keys are read
    (``ConfigError`` if they are bad) and Redis is reached on first use.
    """
    metrics = Metrics()
    chain = build_chain(
        settings, metrics, credential=credential, clock=clock, process_share=process_share
    )
    metrics.record_reload(successful=True, at=clock(), policies=len(policies))
    return Services(
        settings,
        policies,
        chain.cache,
        build_authenticator(settings, clock),
        chain.sts,
        clock,
        metrics,
        quotas=caller_request_quota(settings, metrics, clock),
        sts_quota=caller_sts_quota(settings, metrics, chain, clock, process_share),
    )


def caller_request_quota(settings: Settings, metrics: Metrics, clock: Clock) -> CallerQuotas:
    """The request-rate quota per caller (per process; off unless configured)."""
    quota = settings.quotas
    return CallerQuotas(
        quota.caller_requests_per_second,
        quota.caller_burst,
        clock,
        on_reject=metrics.quota_rejections.labels(kind="caller_requests").inc,
    )


def caller_sts_quota(
    settings: Settings,
    metrics: Metrics,
    chain: CredentialChain,
    clock: Clock,
    process_share: float = 1.0,
) -> CallerStsQuota:
    """Each caller's STS allowance: the fleet's in Redis when the STS budget is shared there."""
    fleet = None
    shared = chain.shared
    if shared is not None and shared.settings.share_sts_budget:
        fleet = FleetBuckets(RedisTokenBuckets(shared.redis, clock), shared.settings.key_prefix)
    quota = settings.quotas
    return CallerStsQuota(
        quota.caller_sts_calls_per_minute,
        quota.caller_sts_burst,
        clock,
        process_share=process_share,
        fleet=fleet,
        on_reject=metrics.quota_rejections.labels(kind="caller_sts").inc,
    )


def build_authenticator(
    settings: Settings, clock: Clock, revoked_at_runtime: Revocations | None = None
) -> Authenticator:
    """API keys, JWT and mTLS as configured; refusing ``auth.revoked``, ``revoked_at_runtime``."""
    jwt = None
    if settings.auth.jwt is not None:
        jwt = _jwt_verifier(settings.auth.jwt, clock)
    certificates = certificate_authenticator(settings)
    revoked = Revocations.from_settings(settings.auth.revoked) | (
        revoked_at_runtime or Revocations()
    )
    return Authenticator(api_key_authenticator(settings), jwt, certificates, revoked)


def _jwt_verifier(settings: JwtSettings, clock: Clock) -> JwtVerifier:
    jwks = JwksSource(jwks_file=settings.jwks_file, jwks_url=settings.jwks_url, clock=clock)
    return JwtVerifier(settings, jwks, clock=clock)
