"""The composition root: settings and policies wired into the services requests share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from broker.auth import Authenticator, CertificateAuthenticator, api_key_authenticator
from broker.config import JwtSettings, Settings
from broker.credentials.cache import CacheKey, CredentialCache, Fetch
from broker.credentials.redis import SharedStsBudget
from broker.credentials.resilience import FailureGate, RetryPolicy, with_resilience
from broker.credentials.shared_store import SharedCache, SharedCredentialCache, connect_shared_cache
from broker.credentials.sts import CredentialClient, StsClient
from broker.metrics import Metrics
from broker.models import Clock, Principal, system_clock
from broker.oidc import JwksSource, JwtVerifier
from broker.policies import PolicySet
from broker.quotas import CallerQuotas, StsBudget

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
    credential: CredentialClient | None = None,
    clock: Clock = system_clock,
    process_share: float = 1.0,
) -> Services:
    """Wire settings and policies into the shared services.

    ``process_share`` (``1/N`` for one of ``serve --workers N``) is the part of
    the STS call budget this process may spend on its own: all of its budget
    without a shared cache, its fallback while a shared budget in Redis is
    unreachable (the Redis budget itself is the whole fleet's).

    No network I/O happens here; with ``cache.backend: redis`` the encryption
    keys are read (``ConfigError`` if they are bad) and Redis is reached on first use.
    """
    margin = settings.cache.refresh_margin_seconds
    metrics = Metrics()
    shared = None
    if settings.cache.backend == "redis":  # first: a bad keys file stops us before any client
        shared = connect_shared_cache(settings, metrics, clock)
    sts = StsClient(settings.sts, credential=credential, clock=clock, min_validity_seconds=margin)
    fetch = _resilient(
        settings, metrics, metrics.instrument_sts(sts.assume_role), clock, shared, process_share
    )
    make_cache: Callable[..., CredentialCache] = CredentialCache
    if shared is not None:  # the in-process cache in front of Redis
        make_cache = partial(SharedCredentialCache, shared=shared)
    cache = make_cache(
        fetch,
        clock=clock,
        refresh_margin_seconds=margin,
        max_entries=settings.cache.max_entries,
        refresh_fraction=settings.cache.refresh_fraction,
    )
    jwt = None
    if settings.auth.jwt is not None:
        jwt = _jwt_verifier(settings.auth.jwt, clock)
    certificates = None
    if settings.auth.mtls:
        certificates = CertificateAuthenticator(
            {
                caller.common_name: Principal(caller.id, caller.groups, auth_method="mtls")
                for caller in settings.auth.mtls
            }
        )
    authenticator = Authenticator(api_key_authenticator(settings), jwt, certificates)
    quota = settings.quotas
    quotas = CallerQuotas(quota.caller_requests_per_second, quota.caller_burst, clock)
    metrics.track_cache(cache)
    metrics.record_reload(successful=True, at=clock(), policies=len(policies))
    return Services(settings, policies, cache, authenticator, sts, clock, metrics, quotas)


def _jwt_verifier(settings: JwtSettings, clock: Clock) -> JwtVerifier:
    jwks = JwksSource(jwks_file=settings.jwks_file, jwks_url=settings.jwks_url, clock=clock)
    return JwtVerifier(settings, jwks, clock=clock)


def _resilient(
    settings: Settings,
    metrics: Metrics,
    fetch: Fetch,
    clock: Clock,
    shared: SharedCache | None = None,
    process_share: float = 1.0,
) -> Fetch:
    """AssumeRole behind the failure gate, each attempt inside the STS budget, retried.

    Retries and waits use real time (``asyncio.sleep``); ``clock`` decides
    budgets and gate windows so tests can move it.  With a shared cache whose
    ``share_sts_budget`` is on, the budget is the fleet's, kept in Redis.
    """
    sts = settings.sts
    quota = settings.quotas
    retry = RetryPolicy(
        max_attempts=sts.retry.max_attempts,
        base_delay_seconds=sts.retry.base_delay_seconds,
        max_delay_seconds=sts.retry.max_delay_seconds,
        deadline_seconds=sts.retry.deadline_seconds,
    )
    on_reject = metrics.quota_rejections.labels("sts_budget").inc
    rate, burst, max_wait = quota.sts_calls_per_second, quota.sts_burst, quota.sts_max_wait_seconds
    budget: StsBudget
    local_rate, local_burst = rate * process_share, max(1.0, burst * process_share)
    if shared is not None and shared.settings.share_sts_budget:
        key = f"{shared.settings.key_prefix}sts-budget"
        budget = SharedStsBudget(
            shared.redis,
            key,
            rate,
            burst,
            clock,
            max_wait,
            on_reject=on_reject,
            fallback_rate_per_second=local_rate,
            fallback_burst=local_burst,
        )
    else:
        budget = StsBudget(
            local_rate, local_burst, clock, max_wait_seconds=max_wait, on_reject=on_reject
        )
    gate = FailureGate(
        threshold=sts.failure_gate.threshold,
        open_seconds=sts.failure_gate.open_seconds,
        clock=clock,
    )
    return with_resilience(fetch, retry=retry, budget=budget, gate=gate, key=CacheKey.for_request)
