"""Credential cache: expiry margin, early background refresh, single flight, injected clock.

Rules, each pinned by tests/test_cache.py:

* An entry is served until ``expiration - refresh_margin_seconds`` and never after.
* Concurrent misses for one key share one in-flight AssumeRole (botocore's
  refresh lock, done with a shared task).  A caller that goes away does not
  cancel the shared call.
* Once less than ``refresh_fraction`` of an entry's lifetime is left (minus up
  to 20 % jitter, so a fleet of entries does not refresh in lock-step), the
  next request starts one background refresh and is still served the current
  entry.  A failed refresh is logged, not cached, and retried after a pause.
* Errors are never cached: the next request after a failure calls STS again.
* The key is everything that shapes the credentials (role, rendered policy
  digest, duration, external id, session name), so two equal keys always mean
  interchangeable credentials and an edited policy gets a new entry.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Literal

import structlog

from broker.errors import BrokerError, UpstreamError
from broker.models import AssumeRoleRequest, Clock, Credentials, system_clock

__all__ = ["CacheKey", "CacheResult", "CacheStats", "CredentialCache", "Fetch"]

log = structlog.get_logger("broker.credentials.cache")

Fetch = Callable[[AssumeRoleRequest], Awaitable[Credentials]]
Source = Literal["hit", "miss", "refresh", "stale"]

_JITTER_SHARE = 0.2
_REFRESH_RETRY_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Everything that determines a set of credentials."""

    role_arn: str
    policy_digest: str
    duration_seconds: int
    external_id: str | None
    role_session_name: str

    @classmethod
    def for_request(cls, request: AssumeRoleRequest) -> CacheKey:
        """The key of ``request``: its policy by sha256 digest, the rest verbatim."""
        return cls(
            role_arn=request.role_arn,
            policy_digest=hashlib.sha256(request.policy.encode()).hexdigest(),
            duration_seconds=request.duration_seconds,
            external_id=request.external_id,
            role_session_name=request.role_session_name,
        )


@dataclass(frozen=True, slots=True)
class CacheResult:
    """Credentials and where they came from.

    ``hit``, ``miss``, ``refresh`` (fetched because ``min_ttl_seconds`` was not
    met) or ``stale`` (that fetch failed and ``min_ttl_seconds`` was only a
    preference, so the cached, still servable entry was returned).
    """

    credentials: Credentials
    source: Source


@dataclass(slots=True)
class CacheStats:
    """Counters for logs and metrics."""

    hits: int = 0
    misses: int = 0
    forced_refreshes: int = 0
    background_refreshes: int = 0
    refresh_failures: int = 0
    fetches: int = 0
    evictions: int = 0


@dataclass(slots=True)
class _Entry:
    credentials: Credentials
    serve_until: float
    refresh_at: float


class CredentialCache:
    """Bounded LRU of credentials keyed by ``CacheKey``, filled through ``fetch``."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Clock = system_clock,
        refresh_margin_seconds: float = 60.0,
        max_entries: int = 100_000,
        refresh_fraction: float = 0.5,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._margin = refresh_margin_seconds
        self._max_entries = max_entries
        self._refresh_fraction = refresh_fraction
        self._jitter = jitter
        self._entries: OrderedDict[CacheKey, _Entry] = OrderedDict()
        self._inflight: dict[CacheKey, asyncio.Task[Credentials]] = {}
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    async def get(
        self,
        request: AssumeRoleRequest,
        *,
        min_ttl_seconds: float = 0.0,
        min_ttl_is_preference: bool = False,
    ) -> CacheResult:
        """Credentials for ``request`` with at least ``min_ttl_seconds`` of validity left.

        With ``min_ttl_is_preference``, a failed fetch for more validity falls
        back to the cached entry (still inside its serving window) instead of
        raising: the caller clamps to what it has.
        """
        key = CacheKey.for_request(request)
        now = self._clock()
        entry = self._entries.get(key)
        if entry is not None and now < entry.serve_until:
            if entry.credentials.expires_at - now >= min_ttl_seconds:
                self._entries.move_to_end(key)
                self.stats.hits += 1
                if now >= entry.refresh_at:
                    self._refresh_in_background(key, request, entry, now)
                return CacheResult(entry.credentials, "hit")
            self.stats.forced_refreshes += 1
            wanted = replace(request, min_expires_at=now + min_ttl_seconds)
            try:
                credentials = await self._shared_fetch(key, wanted)
            except UpstreamError:
                # Only while the entry is still servable: the failed fetch took time.
                if not min_ttl_is_preference or self._clock() >= entry.serve_until:
                    raise
                return CacheResult(entry.credentials, "stale")
            return CacheResult(credentials, "refresh")
        if entry is not None:
            del self._entries[key]
        self.stats.misses += 1
        wanted = replace(request, min_expires_at=now + max(min_ttl_seconds, self._margin))
        return CacheResult(await self._shared_fetch(key, wanted), "miss")

    async def join(self) -> None:
        """Wait until no fetch or background refresh is in flight (for tests and shutdown)."""
        while pending := [task for task in self._inflight.values() if not task.done()]:
            await asyncio.wait(pending)

    async def close(self) -> None:
        """Cancel in-flight fetches and background refreshes."""
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task

    def _shared_fetch(self, key: CacheKey, request: AssumeRoleRequest) -> Awaitable[Credentials]:
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_and_store(key, request))
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        # shield: a caller that disconnects must not cancel the call others share.
        return asyncio.shield(task)

    def _finished(self, key: CacheKey, task: asyncio.Task[Credentials]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters (if any) already got it

    async def _fetch_and_store(self, key: CacheKey, request: AssumeRoleRequest) -> Credentials:
        self.stats.fetches += 1
        credentials = await self._fetch(request)
        self._store(key, credentials)
        return credentials

    def _store(self, key: CacheKey, credentials: Credentials) -> None:
        now = self._clock()
        expires_at = credentials.expires_at
        serve_until = expires_at - self._margin
        lifetime = max(0.0, expires_at - now)
        share = self._refresh_fraction * (1.0 - _JITTER_SHARE * self._jitter())
        refresh_at = min(expires_at - lifetime * share, serve_until)
        self._entries[key] = _Entry(credentials, serve_until, refresh_at)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def _refresh_in_background(
        self, key: CacheKey, request: AssumeRoleRequest, entry: _Entry, now: float
    ) -> None:
        if key in self._inflight:
            return
        self.stats.background_refreshes += 1
        # Until this refresh lands or fails, later hits must not start another.
        entry.refresh_at = min(now + _REFRESH_RETRY_SECONDS, entry.serve_until)
        task = self._shared_fetch(key, request)
        asyncio.ensure_future(task).add_done_callback(self._log_refresh_failure)

    def _log_refresh_failure(self, future: asyncio.Future[Credentials]) -> None:
        if future.cancelled():
            return
        err = future.exception()
        if err is not None:
            self.stats.refresh_failures += 1
            log.warning(
                "background_refresh_failed",
                error_code=getattr(err, "code", type(err).__name__),
            )
