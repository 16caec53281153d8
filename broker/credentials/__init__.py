"""The credential chain: where a request's STS credentials come from.

A request asks the outermost box; each box either answers or asks the next::

    request ─▶ L1 in-process cache ........ cache.py         CredentialCache
               │  miss, min_ttl, refresh-ahead; concurrent misses share one call;
               │  entries leave memory when their serving window ends; the request
               │  that starts a call pays its caller's STS share (``charge``)
               ▼
               shared store (optional) .... shared_store.py  SharedCredentialStore
               │  Redis: sealed values (sealing.py), a fleet-wide single flight;
               │  the connection and its health: redis.py (SharedRedis)
               ▼
               failure gate ............... resilience.py    FailureGate
               │  stops calling STS for a key after repeated non-transient errors
               ▼
               retries .................... resilience.py    RetryPolicy
               │  full-jitter backoff, one deadline; only for retryable errors
               ▼
               budget ..................... budget.py        StsBudget
               │  every attempt takes a slot: this process's bucket or the fleet's
               │  (SharedBucket in Redis); FIFO queue, bounded wait, else 503
               ▼
               deadline ................... deadline.py      with_effective_lifetime
               │  a short-lived request's acs:CurrentTime deadline, rendered per attempt
               ▼
               STS (official SDK) ......... sts.py           StsClient
                  AssumeRole, always with an inline Policy; SDK errors translated once

``chain.py`` builds all of it from the settings (``build_chain``).  Each box is
a plain object or function taking the next one's fetch, so tests can put a
real STS emulator or Redis behind any of them.
"""

from __future__ import annotations

from broker.credentials.budget import SharedBucket, StsBudget, TokenBucket
from broker.credentials.cache import CacheKey, CacheResult, CredentialCache
from broker.credentials.chain import CredentialChain, build_chain
from broker.credentials.redis import SharedCacheUnavailable
from broker.credentials.sts import (
    SourceCredential,
    StsClient,
    default_credential,
    static_credential,
)

__all__ = [
    "CacheKey",
    "CacheResult",
    "CredentialCache",
    "CredentialChain",
    "SharedBucket",
    "SharedCacheUnavailable",
    "SourceCredential",
    "StsBudget",
    "StsClient",
    "TokenBucket",
    "build_chain",
    "default_credential",
    "static_credential",
]
