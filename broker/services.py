"""The composition root: settings and policies wired into the services requests share."""

from __future__ import annotations

from dataclasses import dataclass

from broker.auth import Authenticator, api_key_authenticator, certificate_authenticator
from broker.config import JwtSettings, Settings
from broker.credentials.cache import CredentialCache
from broker.credentials.chain import build_chain
from broker.credentials.sts import SourceCredential, StsClient
from broker.metrics import Metrics
from broker.models import Clock, system_clock
from broker.oidc import JwksSource, JwtVerifier
from broker.policies import PolicySet
from broker.quotas import CallerQuotas

__all__ = ["Services", "build_services"]


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
    shutting_down: bool = False


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
    the STS call budget this process may spend (``credentials.chain.sts_budget``).
    No network I/O happens here; with ``cache.backend: redis`` the encryption
    keys are read (``ConfigError`` if they are bad) and Redis is reached on first use.
    """
    metrics = Metrics()
    chain = build_chain(
        settings, metrics, credential=credential, clock=clock, process_share=process_share
    )
    quota = settings.quotas
    quotas = CallerQuotas(quota.caller_requests_per_second, quota.caller_burst, clock)
    metrics.record_reload(successful=True, at=clock(), policies=len(policies))
    authenticator = _authenticator(settings, clock)
    return Services(
        settings, policies, chain.cache, authenticator, chain.sts, clock, metrics, quotas
    )


def _authenticator(settings: Settings, clock: Clock) -> Authenticator:
    """API keys, and JWT and mTLS when configured."""
    jwt = None
    if settings.auth.jwt is not None:
        jwt = _jwt_verifier(settings.auth.jwt, clock)
    certificates = certificate_authenticator(settings)
    return Authenticator(api_key_authenticator(settings), jwt, certificates)


def _jwt_verifier(settings: JwtSettings, clock: Clock) -> JwtVerifier:
    jwks = JwksSource(jwks_file=settings.jwks_file, jwks_url=settings.jwks_url, clock=clock)
    return JwtVerifier(settings, jwks, clock=clock)
