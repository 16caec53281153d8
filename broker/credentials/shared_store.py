"""Shared credential cache on Redis: sealed values and a fleet-wide single flight.

With ``cache.backend: redis`` every process keeps its in-process cache
(``broker.credentials.cache.CredentialCache``, the L1) and, behind it, this store.
Rules, each pinned by tests/credentials/test_shared_store.py:

* A value is the credentials as JSON, sealed (``broker.credentials.sealing``)
  with the Redis key as associated data, so a value copied to another key
  does not open.  A value that does not open (tampered, moved, unknown key)
  is a miss.
* The Redis key is ``key_prefix`` + ``cred:`` + the sha256 of the
  ``CacheKey`` fields; a value lives until ``expiration -
  refresh_margin_seconds`` and nothing already inside the margin is stored.
* On an L1 miss: read Redis; on a miss, ``SET lock NX PX lock_ttl``.  The
  holder calls STS (the resilient, budgeted, instrumented fetch), writes the
  value and deletes the lock if it is still its own (token compared in Lua).
  The others poll, with a short capped backoff, for at most ``wait_seconds``:
  a holder that dies leaves a lock that expires, and the next poll takes it
  over; a waiter that runs out of time calls STS itself.
* A refresh (the L1 already got credentials for the key from here) only
  accepts a value newer than those, so early refreshes and ``min_ttl`` reach
  STS once for the fleet rather than never.
* Redis never fails a request: an error or timeout (each operation is
  bounded by ``operation_timeout_seconds``) means calling STS directly,
  counted in ``broker_shared_cache_degraded_total`` and logged as
  ``shared_cache_degraded`` at most every 30 s (``broker.credentials.redis.SharedRedis``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from redis.asyncio import Redis

from broker.config import RedisSettings
from broker.credentials.cache import CacheKey, CredentialCache, Fetch
from broker.credentials.redis import SharedCacheUnavailable, SharedRedis
from broker.credentials.sealing import EncryptionKeys, open_sealed, seal
from broker.models import AssumeRoleRequest, Clock, Credentials

__all__ = ["SharedCache", "SharedCredentialCache", "SharedCredentialStore"]

log = structlog.get_logger("broker.credentials.shared_store")

_FIRST_POLL_SECONDS = 0.005
_MAX_POLL_SECONDS = 0.05

# Deletes the lock only while it still holds our token: a lock that expired
# and was taken over by another process is not ours to delete.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


def _dump_credentials(credentials: Credentials) -> bytes:
    return json.dumps(
        {
            "access_key_id": credentials.access_key_id,
            "access_key_secret": credentials.access_key_secret,
            "security_token": credentials.security_token,
            "expiration": credentials.expiration.isoformat(),
        },
        separators=(",", ":"),
    ).encode()


def _load_credentials(data: bytes) -> Credentials:
    doc: dict[str, Any] = json.loads(data)
    return Credentials(
        access_key_id=str(doc["access_key_id"]),
        access_key_secret=str(doc["access_key_secret"]),
        security_token=str(doc["security_token"]),
        expiration=datetime.fromisoformat(doc["expiration"]),
    )


@dataclass(frozen=True, slots=True)
class _Slot:
    """The Redis keys of one ``CacheKey`` (by the sha256 of its fields) and what we last gave."""

    digest: str
    value_key: str
    lock_key: str
    newer_than: float | None  # expires_at of what this process last handed out for the key
    min_expires_at: float = 0.0  # what the caller needs (min_ttl_seconds)


class SharedCredentialStore:
    """The shared layer behind the L1: ``wrap(fetch)`` returns a fetch that goes through Redis."""

    def __init__(
        self,
        redis: SharedRedis,
        keys: EncryptionKeys,
        *,
        clock: Clock,
        key_prefix: str = "oss-sts-broker:",
        refresh_margin_seconds: float = 60.0,
        lock_ttl_seconds: float = 10.0,
        wait_seconds: float = 5.0,
        max_entries: int = 100_000,
        monotonic: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self._redis = redis
        self._keys = keys
        self._clock = clock
        self._prefix = key_prefix
        self._margin = refresh_margin_seconds
        self._lock_ms = max(1, int(lock_ttl_seconds * 1000))
        self._wait = wait_seconds
        self._max_entries = max_entries
        self._monotonic = monotonic
        self._sleep = sleep
        self._handed_out: OrderedDict[str, float] = OrderedDict()
        self._release = redis.client.register_script(_RELEASE_LUA)

    def value_key(self, request: AssumeRoleRequest) -> str:
        """The Redis key holding the sealed credentials for ``request``."""
        return self._slot(request).value_key

    def lock_key(self, request: AssumeRoleRequest) -> str:
        """The Redis key of the single-flight lock for ``request``."""
        return self._slot(request).lock_key

    def wrap(self, fetch: Fetch) -> Fetch:
        """``fetch`` behind the shared cache and its fleet-wide single flight."""

        async def shared_fetch(request: AssumeRoleRequest) -> Credentials:
            return await self._get(fetch, request)

        return shared_fetch

    async def peek(self, request: AssumeRoleRequest) -> Credentials | None:
        """A usable value for ``request`` already in Redis; None if not (or Redis fails).

        Reads only: no lock, no STS.  The L1 peeks before charging a caller for
        a fetch (``CredentialCache._peek``), so what the fleet holds is free.
        """
        slot = self._slot(request)
        try:
            found = await self._read(slot)
        except SharedCacheUnavailable:
            return None
        if found is not None:
            self._remember(slot.digest, found)
        return found

    def _slot(self, request: AssumeRoleRequest) -> _Slot:
        fields = dataclasses.astuple(CacheKey.for_request(request))
        digest = hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()
        return _Slot(
            digest,
            f"{self._prefix}cred:{digest}",
            f"{self._prefix}lock:{digest}",
            self._handed_out.get(digest),
            request.min_expires_at,
        )

    async def _get(self, fetch: Fetch, request: AssumeRoleRequest) -> Credentials:
        slot = self._slot(request)
        try:
            claim = await self._claim(slot)
        except SharedCacheUnavailable:
            credentials = await fetch(request)  # Redis is down: straight to STS
        else:
            if isinstance(claim, Credentials):
                credentials = claim
            else:
                credentials = await self._fetch_and_publish(fetch, request, slot, claim)
        self._remember(slot.digest, credentials)
        return credentials

    async def _claim(self, slot: _Slot) -> Credentials | str | None:
        """A usable value, our lock token (we call STS), or None once ``wait_seconds`` ran out."""
        token = secrets.token_hex(16)
        deadline = self._monotonic() + self._wait
        delay = _FIRST_POLL_SECONDS
        while True:
            found = await self._read(slot)
            if found is not None:
                return found
            if await self._redis.run("lock", lambda r: self._lock(r, slot, token)):
                return token
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                log.warning("shared_cache_wait_expired", wait_seconds=self._wait)
                return None
            await self._sleep(min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL_SECONDS)

    async def _lock(self, client: Redis, slot: _Slot, token: str) -> bool:
        return bool(await client.set(slot.lock_key, token, nx=True, px=self._lock_ms))

    async def _read(self, slot: _Slot) -> Credentials | None:
        blob = await self._redis.run("read", lambda r: r.get(slot.value_key))
        if blob is None:
            return None
        credentials = self._open(slot, blob if isinstance(blob, bytes) else blob.encode())
        if credentials is None or credentials.expires_at - self._margin <= self._clock():
            return None
        if slot.newer_than is not None and credentials.expires_at <= slot.newer_than:
            return None  # a refresh wants something newer than what the L1 holds
        if credentials.expires_at < slot.min_expires_at:
            return None  # the caller asked for more validity (min_ttl_seconds)
        return credentials

    def _open(self, slot: _Slot, blob: bytes) -> Credentials | None:
        try:
            plaintext = open_sealed(self._keys, blob, slot.value_key.encode())
            return _load_credentials(plaintext)
        except (ValueError, TypeError, KeyError) as err:
            log.warning("shared_cache_value_rejected", reason=str(err) or type(err).__name__)
            return None

    async def _fetch_and_publish(
        self, fetch: Fetch, request: AssumeRoleRequest, slot: _Slot, token: str | None
    ) -> Credentials:
        try:
            credentials = await fetch(request)
        except BaseException:
            if token is not None:
                await self._unlock(slot, token)
            raise
        await self._write(slot, credentials)
        if token is not None:
            await self._unlock(slot, token)
        return credentials

    async def _write(self, slot: _Slot, credentials: Credentials) -> None:
        ttl_ms = int((credentials.expires_at - self._margin - self._clock()) * 1000)
        if ttl_ms <= 0:
            return  # already inside the margin: never stored
        blob = seal(self._keys, _dump_credentials(credentials), slot.value_key.encode())
        with contextlib.suppress(SharedCacheUnavailable):
            await self._redis.run("write", lambda r: r.set(slot.value_key, blob, px=ttl_ms))

    async def _unlock(self, slot: _Slot, token: str) -> None:
        with contextlib.suppress(SharedCacheUnavailable):
            await self._redis.run(
                "unlock", lambda r: self._release(keys=[slot.lock_key], args=[token], client=r)
            )

    def _remember(self, digest: str, credentials: Credentials) -> None:
        self._handed_out[digest] = credentials.expires_at
        self._handed_out.move_to_end(digest)
        while len(self._handed_out) > self._max_entries:
            self._handed_out.popitem(last=False)


@dataclass(frozen=True, slots=True)
class SharedCache:
    """The Redis side of ``cache.backend: redis``: its settings, connection and store."""

    settings: RedisSettings
    redis: SharedRedis
    store: SharedCredentialStore

    async def close(self) -> None:
        """Close the Redis connections."""
        await self.redis.close()


class SharedCredentialCache(CredentialCache):
    """The in-process cache in front of a ``SharedCache``; closing it closes Redis too."""

    def __init__(
        self,
        fetch: Fetch,
        *,
        shared: SharedCache,
        clock: Clock,
        refresh_margin_seconds: float = 60.0,
        max_entries: int = 100_000,
        refresh_fraction: float = 0.5,
    ) -> None:
        super().__init__(
            shared.store.wrap(fetch),
            clock=clock,
            refresh_margin_seconds=refresh_margin_seconds,
            max_entries=max_entries,
            refresh_fraction=refresh_fraction,
        )
        self.shared = shared

    async def close(self) -> None:
        """Cancel in-flight fetches, then close the Redis connections."""
        await super().close()
        await self.shared.close()

    async def _peek(self, request: AssumeRoleRequest) -> Credentials | None:
        return await self.shared.store.peek(request)
