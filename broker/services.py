"""The composition root: settings and policies wired into the services requests share."""

from __future__ import annotations

from dataclasses import dataclass

from broker.auth import ApiKeyAuthenticator, Authenticator
from broker.cache import CredentialCache
from broker.config import Settings, api_key_hashes
from broker.metrics import Metrics
from broker.models import Clock, system_clock
from broker.policies import PolicySet
from broker.sts import CredentialClient, StsClient

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
    shutting_down: bool = False


def build_services(
    settings: Settings,
    policies: PolicySet,
    *,
    credential: CredentialClient | None = None,
    clock: Clock = system_clock,
) -> Services:
    """Wire settings and policies into the shared services (no I/O happens here)."""
    margin = settings.cache.refresh_margin_seconds
    metrics = Metrics()
    sts = StsClient(settings.sts, credential=credential, clock=clock, min_validity_seconds=margin)
    cache = CredentialCache(
        metrics.instrument_sts(sts.assume_role),
        clock=clock,
        refresh_margin_seconds=margin,
        max_entries=settings.cache.max_entries,
        refresh_fraction=settings.cache.refresh_fraction,
    )
    groups = {key.id: key.groups for key in settings.auth.api_keys}
    authenticator = Authenticator(ApiKeyAuthenticator(api_key_hashes(settings), groups))
    metrics.track_cache(cache)
    metrics.record_reload(successful=True, at=clock(), policies=len(policies))
    return Services(settings, policies, cache, authenticator, sts, clock, metrics)
