"""Building the credential chain from settings: each box of ``broker.credentials``, wired once.

The order, outside in (drawn in the package docstring): L1 cache → shared
store (``cache.backend: redis``) → failure gate → retries → budget → STS.
Nothing here touches the network; with Redis, the encryption keys are read
first, so a bad keys file stops start-up before any client exists.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial

from broker.config import Settings
from broker.credentials.budget import SharedBucket, StsBudget
from broker.credentials.cache import CacheKey, CredentialCache, Fetch
from broker.credentials.redis import connect_redis
from broker.credentials.resilience import FailureGate, RetryPolicy, with_resilience
from broker.credentials.sealing import load_encryption_keys
from broker.credentials.shared_store import (
    SharedCache,
    SharedCredentialCache,
    SharedCredentialStore,
)
from broker.credentials.sts import SourceCredential, StsClient
from broker.errors import ConfigError
from broker.metrics import Metrics
from broker.models import Clock, system_clock

__all__ = ["CredentialChain", "build_chain", "connect_shared_cache", "resilient", "sts_budget"]


@dataclass(frozen=True, slots=True)
class CredentialChain:
    """The chain's two ends: the cache requests read, and the STS client (for health checks).

    ``shared`` is the Redis side with ``cache.backend: redis`` (the per-caller
    STS quota keeps its fleet buckets there), else None.
    """

    cache: CredentialCache
    sts: StsClient
    shared: SharedCache | None = None


def build_chain(
    settings: Settings,
    metrics: Metrics,
    *,
    credential: SourceCredential | None = None,
    clock: Clock = system_clock,
    process_share: float = 1.0,
) -> CredentialChain:
    """The whole chain for ``settings``; ``process_share`` as in ``sts_budget``."""
    shared = None
    if settings.cache.backend == "redis":  # first: a bad keys file stops us before any client
        shared = connect_shared_cache(settings, metrics, clock)
    margin = settings.cache.refresh_margin_seconds
    sts = StsClient(settings.sts, credential=credential, clock=clock, min_validity_seconds=margin)
    budget = sts_budget(settings, metrics, clock, shared, process_share)
    fetch = resilient(settings, metrics.instrument_sts(sts.fetch), budget, clock)
    cache = _cache(settings, fetch, clock, shared)
    metrics.track_cache(cache)
    return CredentialChain(cache, sts, shared)


def connect_shared_cache(
    settings: Settings,
    metrics: Metrics,
    clock: Clock,
    *,
    environ: Mapping[str, str] | None = None,
) -> SharedCache:
    """Read the encryption keys and set up the client (it connects on first use)."""
    redis_settings = settings.cache.redis
    if redis_settings is None:
        raise ConfigError(["cache.redis: backend redis needs a redis section"])
    environ = os.environ if environ is None else environ
    config_dir = settings.source.parent if settings.source is not None else None
    keys = load_encryption_keys(redis_settings, config_dir=config_dir, environ=environ)
    redis = connect_redis(redis_settings, metrics.shared_cache_degraded, environ)
    store = SharedCredentialStore(
        redis,
        keys,
        clock=clock,
        key_prefix=redis_settings.key_prefix,
        refresh_margin_seconds=settings.cache.refresh_margin_seconds,
        lock_ttl_seconds=redis_settings.lock_ttl_seconds,
        wait_seconds=redis_settings.wait_seconds,
        max_entries=settings.cache.max_entries,
    )
    return SharedCache(redis_settings, redis, store)


def sts_budget(
    settings: Settings,
    metrics: Metrics,
    clock: Clock,
    shared: SharedCache | None = None,
    process_share: float = 1.0,
) -> StsBudget:
    """The STS call budget: the fleet's in Redis if ``share_sts_budget``, else this process's.

    ``process_share`` (``1/N`` for one of ``serve --workers N``) is the part of
    ``quotas.sts_calls_per_second`` and ``sts_burst`` this process may spend on
    its own: all of its budget without a shared one, its fallback while the
    fleet's bucket in Redis is unreachable.
    """
    quota = settings.quotas
    rate, burst = quota.sts_calls_per_second, quota.sts_burst
    bucket = None
    if shared is not None and shared.settings.share_sts_budget:
        key = f"{shared.settings.key_prefix}sts-budget"
        bucket = SharedBucket(shared.redis, key, rate, burst, clock)
    return StsBudget(
        rate * process_share,
        max(1.0, burst * process_share),
        clock,
        max_wait_seconds=quota.sts_max_wait_seconds,
        on_reject=metrics.quota_rejections.labels(kind="sts_budget").inc,
        shared=bucket,
    )


def resilient(settings: Settings, fetch: Fetch, budget: StsBudget, clock: Clock) -> Fetch:
    """``fetch`` behind the failure gate, each attempt inside ``budget``, retried.

    Retries and waits use real time (``asyncio.sleep``); ``clock`` decides
    budgets and gate windows so tests can move it.
    """
    sts = settings.sts
    retry = RetryPolicy(
        max_attempts=sts.retry.max_attempts,
        base_delay_seconds=sts.retry.base_delay_seconds,
        max_delay_seconds=sts.retry.max_delay_seconds,
        deadline_seconds=sts.retry.deadline_seconds,
        attempt_timeout_seconds=sts.timeout_seconds,
    )
    gate = FailureGate(
        threshold=sts.failure_gate.threshold,
        open_seconds=sts.failure_gate.open_seconds,
        clock=clock,
    )
    return with_resilience(fetch, retry=retry, budget=budget, gate=gate, key=CacheKey.for_request)


def _cache(
    settings: Settings, fetch: Fetch, clock: Clock, shared: SharedCache | None
) -> CredentialCache:
    """The L1 cache; with a shared cache, in front of it (and closing Redis with it)."""
    make: Callable[..., CredentialCache] = CredentialCache
    if shared is not None:
        make = partial(SharedCredentialCache, shared=shared)
    return make(
        fetch,
        clock=clock,
        refresh_margin_seconds=settings.cache.refresh_margin_seconds,
        max_entries=settings.cache.max_entries,
        refresh_fraction=settings.cache.refresh_fraction,
    )
