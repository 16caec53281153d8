"""Credential cache: expiry margin, early background refresh, single flight, injected clock.

Rules, each pinned by tests/credentials/test_cache.py:

* An entry is served until ``expiration - refresh_margin_seconds`` and never
  after, and it leaves memory then, asked for or not: the entries are a
  ``cachetools.TLRUCache`` whose time-to-use is that moment on the injected
  clock, and since a TLRUCache only expires lazily, the cache wakes itself
  (``loop.call_later``) when the earliest serving window ends and purges
  (both in ``entries.py``: ``Entries`` and ``Purge``).
  Past ``max_entries`` the least recently used entry is evicted.
* Concurrent misses for one key share one in-flight AssumeRole (botocore's
  refresh lock, done with a shared task).  A caller that goes away does not
  cancel the shared call.
* Once less than ``refresh_fraction`` of an entry's lifetime is left (minus up
  to 20 % jitter, so a fleet of entries does not refresh in lock-step), the
  next request starts one background refresh and is still served the current
  entry.  A failed refresh is logged, not cached, and retried after a pause.
* Errors are never cached: the next request after a failure calls STS again.
* A request that starts a fetch (a miss, or a ``min_ttl_seconds`` refresh)
  pays for it through its ``charge`` (``broker.quotas.CallerStsQuota``), just
  before the fetch starts; a refused charge refuses only that request (with a
  ``min_ttl`` that is only a preference, it is served the cached entry).
  Requests that join a fetch in flight and background refreshes pay nothing;
  what a shared cache already holds (``_peek``) is taken without paying; and
  a fetch that took no STS budget slot (``budget.count_sts_calls``: the shared
  cache answered after all, the gate or the budget refused) is given back.
* The key is everything that shapes the credentials (role, rendered policy
  digest, duration, external id, session name, effective lifetime, federated
  user), so two equal keys always mean interchangeable credentials and an
  edited policy gets a new entry.
* ``purge(session_names)`` drops every entry of those callers (by their
  ``RoleSessionName``, which is in the key) at once, and a fetch of theirs
  still in flight is not stored when it lands (revocation).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Literal, Protocol

import structlog

from broker.credentials.budget import count_sts_calls
from broker.credentials.entries import CallLater, Entries, Entry, Purge
from broker.errors import BrokerError, TooManyRequests, UpstreamError
from broker.models import AssumeRoleRequest, Clock, Credentials, system_clock

__all__ = [
    "CacheKey",
    "CacheResult",
    "CacheStats",
    "CachedEntry",
    "CallLater",
    "Charge",
    "CredentialCache",
    "Fetch",
]

log = structlog.get_logger("broker.credentials.cache")

Fetch = Callable[[AssumeRoleRequest], Awaitable[Credentials]]
Source = Literal["hit", "miss", "refresh", "stale"]

_JITTER_SHARE = 0.2
_REFRESH_RETRY_SECONDS = 10.0


class Charge(Protocol):
    """Who pays for a fetch a request starts (``CredentialCache.get(charge=...)``)."""

    async def take(self) -> None:
        """Pay for one fetch, or raise ``TooManyRequests`` to refuse the request."""
        ...

    async def give_back(self) -> None:
        """Refund a fetch that was paid for but made no STS call."""
        ...


@dataclass(frozen=True, slots=True)
class CacheKey:
    """Everything that determines a set of credentials."""

    role_arn: str
    policy_digest: str
    duration_seconds: int
    external_id: str | None
    role_session_name: str
    effective_lifetime_seconds: int | None = None
    federation: str | None = None
    """Who the credentials belong to when they come from the caller's own token."""
    _hash: int = field(init=False, repr=False, compare=False, default=0)

    def __post_init__(self) -> None:
        # Hashed once: every lookup hashes its key (three times, in the TLRU cache).
        object.__setattr__(self, "_hash", hash(self.parts()))

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if type(other) is not CacheKey:
            return NotImplemented
        return self._hash == other._hash and self.parts() == other.parts()

    def parts(self) -> tuple[object, ...]:
        """The fields that determine the credentials, in order (what the shared store digests)."""
        return (
            self.role_arn,
            self.policy_digest,
            self.duration_seconds,
            self.external_id,
            self.role_session_name,
            self.effective_lifetime_seconds,
            self.federation,
        )

    @classmethod
    def for_request(cls, request: AssumeRoleRequest) -> CacheKey:
        """The key of ``request``: its policy by sha256 digest, the rest verbatim."""
        return cls(
            role_arn=request.role_arn,
            policy_digest=hashlib.sha256(request.policy.encode()).hexdigest(),
            duration_seconds=request.duration_seconds,
            external_id=request.external_id,
            role_session_name=request.role_session_name,
            effective_lifetime_seconds=request.effective_lifetime_seconds,
            federation=request.federation,
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


@dataclass(frozen=True, slots=True)
class CachedEntry:
    """What the admin channel shows of one cached entry: never the secret or the token."""

    key: CacheKey
    access_key_id: str
    expires_at: float
    serve_until: float


class CredentialCache:
    """Bounded LRU of credentials keyed by ``CacheKey``, filled through ``fetch``.

    ``call_later`` schedules the purge of expired entries; by default the
    running loop's (tests pass their own to run it at a moment of their choosing).
    """

    def __init__(
        self,
        fetch: Fetch,
        *,
        clock: Clock = system_clock,
        refresh_margin_seconds: float = 60.0,
        max_entries: int = 100_000,
        refresh_fraction: float = 0.5,
        jitter: Callable[[], float] = random.random,
        call_later: CallLater | None = None,
    ) -> None:
        self._fetch = fetch
        self._clock = clock
        self._margin = refresh_margin_seconds
        self._refresh_fraction = refresh_fraction
        self._jitter = jitter
        self.stats = CacheStats()
        self._entries = Entries(max_entries, clock, self.stats)
        self._purge = Purge(self._entries, clock, call_later)
        self._inflight: dict[CacheKey, asyncio.Task[Credentials]] = {}
        self._paying: dict[CacheKey, asyncio.Event] = {}  # a request paying for a new fetch
        self._discard: set[CacheKey] = set()  # purged while a fetch was in flight

    def __len__(self) -> int:
        """Entries held in memory."""
        return self._entries.held()

    def entries(self, session_names: frozenset[str]) -> list[CachedEntry]:
        """The entries held for these callers (by ``RoleSessionName``), without their secrets."""
        return [
            CachedEntry(
                key,
                entry.credentials.access_key_id,
                entry.credentials.expires_at,
                entry.serve_until,
            )
            for key, entry in self._entries.held_for(session_names)
        ]

    def purge(self, session_names: frozenset[str]) -> int:
        """Drop every entry of these callers; their fetches in flight are not stored.  How many.

        A scan of the entries (at most ``max_entries``): revocation is rare,
        and an index would have to follow every LRU eviction and expiry.
        """
        doomed = self._entries.held_for(session_names)
        for key, _ in doomed:
            self._entries.drop(key)
        self._discard.update(
            key for key in self._inflight if key.role_session_name in session_names
        )
        return len(doomed)

    async def get(
        self,
        request: AssumeRoleRequest,
        *,
        min_ttl_seconds: float = 0.0,
        min_ttl_is_preference: bool = False,
        charge: Charge | None = None,
        key: CacheKey | None = None,
    ) -> CacheResult:
        """Credentials for ``request`` with at least ``min_ttl_seconds`` of validity left.

        With ``min_ttl_is_preference``, a failed (or refused) fetch for more
        validity falls back to the cached entry (still inside its serving
        window) instead of raising: the caller clamps to what it has.
        ``charge`` pays for a fetch this request starts (none for a hit).
        ``key``: ``CacheKey.for_request(request)``, if the caller has it (the
        hot path's own object: its later lookups then find the entry by identity).
        """
        key = key if key is not None else CacheKey.for_request(request)
        now = self._clock()
        entry = self._entries.lookup(key)  # None once its serving window has ended
        if entry is None:
            return await self._miss(key, request, now, min_ttl_seconds, charge)
        if entry.credentials.expires_at - now >= min_ttl_seconds:
            return self._hit(key, request, entry, now)
        wanted = replace(request, min_expires_at=now + min_ttl_seconds)
        return await self._refresh(key, wanted, entry, charge, fallback=min_ttl_is_preference)

    def fresh(self, key: CacheKey, min_ttl_seconds: float, now: float) -> CacheResult | None:
        """The hot path: the entry for ``key`` if it needs nothing done, else ``None``.

        A hit that is servable, has ``min_ttl_seconds`` left and is not yet due
        for its background refresh; anything else (a miss, a refresh) goes
        through ``get``, which needs the whole ``AssumeRoleRequest``.  ``key``
        must be ``CacheKey.for_request`` of the request ``get`` would be given.
        """
        credentials = self.servable(key, min_ttl_seconds, now)
        if credentials is None:
            return None
        self.stats.hits += 1
        return CacheResult(credentials, "hit")

    def servable(self, key: CacheKey, min_ttl_seconds: float, now: float) -> Credentials | None:
        """What ``fresh`` would serve, without counting a hit (its caller counts one it serves)."""
        entry = self._entries.lookup(key)
        if entry is None or now >= entry.refresh_at:
            return None
        if entry.credentials.expires_at - now < min_ttl_seconds:
            return None
        return entry.credentials

    async def join(self) -> None:
        """Wait until no fetch or background refresh is in flight (for tests and shutdown)."""
        while pending := [task for task in self._inflight.values() if not task.done()]:
            await asyncio.wait(pending)

    async def close(self) -> None:
        """Cancel in-flight fetches, background refreshes and the scheduled purge."""
        self._purge.cancel()
        tasks = list(self._inflight.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, BrokerError):
                await task

    def _hit(
        self, key: CacheKey, request: AssumeRoleRequest, entry: Entry, now: float
    ) -> CacheResult:
        self.stats.hits += 1
        if now >= entry.refresh_at:
            self._refresh_in_background(key, request, entry, now)
        return CacheResult(entry.credentials, "hit")

    async def _refresh(
        self,
        key: CacheKey,
        request: AssumeRoleRequest,
        entry: Entry,
        charge: Charge | None,
        *,
        fallback: bool,
    ) -> CacheResult:
        """Fetch for more validity than ``entry`` has; with ``fallback``, ``entry`` on failure."""
        self.stats.forced_refreshes += 1
        try:
            credentials = await self._shared_fetch(key, request, charge)
        except (UpstreamError, TooManyRequests):
            # Only while the entry is still servable: the failed fetch took time.
            if not fallback or self._clock() >= entry.serve_until:
                raise
            return CacheResult(entry.credentials, "stale")
        return CacheResult(credentials, "refresh")

    async def _miss(
        self,
        key: CacheKey,
        request: AssumeRoleRequest,
        now: float,
        min_ttl_seconds: float,
        charge: Charge | None,
    ) -> CacheResult:
        self._entries.expire(now)  # an expired entry for this key leaves now, not later
        self.stats.misses += 1
        wanted = replace(request, min_expires_at=now + max(min_ttl_seconds, self._margin))
        return CacheResult(await self._shared_fetch(key, wanted, charge), "miss")

    async def _shared_fetch(
        self, key: CacheKey, request: AssumeRoleRequest, charge: Charge | None
    ) -> Credentials:
        """Join the fetch in flight for ``key``, or start one paid for through ``charge``.

        Paying may wait (Redis): meanwhile other requests for ``key`` wait for
        the one paying, then use what it found or join the fetch it started,
        or pay in turn if it was refused.
        """
        while charge is not None and key not in self._inflight:
            paying = self._paying.get(key)
            if paying is None:
                return await self._paid_fetch(key, request, charge)
            await paying.wait()
            entry = self._entries.lookup(key)  # the one paying may have found it shared
            if entry is not None and entry.credentials.expires_at >= request.min_expires_at:
                return entry.credentials
        # shield: a caller that disconnects must not cancel the call others share.
        return await asyncio.shield(self._task(key, request))

    async def _paid_fetch(
        self, key: CacheKey, request: AssumeRoleRequest, charge: Charge
    ) -> Credentials:
        """What the shared cache holds for ``request`` (free), else a fetch paid by ``charge``."""
        paying = self._paying[key] = asyncio.Event()
        try:
            found = await self._peek(request)
            if found is not None:
                self._store(key, found)
                return found
            await charge.take()
        finally:
            del self._paying[key]
            paying.set()
        if key in self._inflight:  # a background refresh started meanwhile: join it
            await charge.give_back()
            return await asyncio.shield(self._inflight[key])
        return await asyncio.shield(self._task(key, request, charge))

    async def _peek(self, request: AssumeRoleRequest) -> Credentials | None:
        """Credentials a shared layer already holds for ``request`` (none here), without STS."""
        return None

    def _task(
        self, key: CacheKey, request: AssumeRoleRequest, charge: Charge | None = None
    ) -> asyncio.Task[Credentials]:
        """The fetch in flight for ``key``, started now (paid by ``charge``) if there is none."""
        task = self._inflight.get(key)
        if task is None:
            fetch = self._fetch_and_store(key, request, charge)
            task = asyncio.get_running_loop().create_task(fetch)
            self._inflight[key] = task
            task.add_done_callback(lambda done: self._finished(key, done))
        return task

    def _finished(self, key: CacheKey, task: asyncio.Task[Credentials]) -> None:
        if self._inflight.get(key) is task:
            del self._inflight[key]
            self._discard.discard(key)
        if not task.cancelled():
            task.exception()  # mark retrieved: waiters (if any) already got it

    async def _fetch_and_store(
        self, key: CacheKey, request: AssumeRoleRequest, charge: Charge | None
    ) -> Credentials:
        self.stats.fetches += 1
        calls = count_sts_calls()  # in this task's own context
        try:
            credentials = await self._fetch(request)
        finally:
            if charge is not None and calls.count == 0:  # no STS call was made
                await charge.give_back()
        self._store(key, credentials)
        return credentials

    def _store(self, key: CacheKey, credentials: Credentials) -> None:
        if key in self._discard:  # purged while this fetch was in flight
            return
        now = self._clock()
        expires_at = credentials.expires_at
        serve_until = expires_at - self._margin
        lifetime = max(0.0, expires_at - now)
        share = self._refresh_fraction * (1.0 - _JITTER_SHARE * self._jitter())
        refresh_at = min(expires_at - lifetime * share, serve_until)
        self._entries[key] = Entry(credentials, serve_until, refresh_at)
        if serve_until > now:  # a TLRUCache does not keep what has already expired
            self._purge.schedule(serve_until)

    def _refresh_in_background(
        self, key: CacheKey, request: AssumeRoleRequest, entry: Entry, now: float
    ) -> None:
        if key in self._inflight:
            return
        self.stats.background_refreshes += 1
        # Until this refresh lands or fails, later hits must not start another.
        entry.refresh_at = min(now + _REFRESH_RETRY_SECONDS, entry.serve_until)
        self._task(key, request).add_done_callback(self._log_refresh_failure)

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
