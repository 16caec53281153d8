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
  new holder reads once more (the previous holder may have published its
  value and released the lock between our read and our lock), then calls STS
  (the resilient, budgeted, instrumented fetch), writes the value and deletes
  the lock if it is still its own (token compared in Lua).  While it fetches
  it renews its lease every third of ``lock_ttl`` (again only while the lock
  is its own), so a slow fetch on a loaded machine keeps the lock, and a
  holder that dies stops renewing and loses it within ``lock_ttl``.
  The others poll, with a short capped backoff, for as long as the lock is
  held and at most ``wait_seconds``: when a dead holder's lock expires the
  next poll takes it over; a waiter that runs out of time calls STS itself
  (so ``wait_seconds`` should exceed one STS fetch: ``sts.retry.deadline_seconds``
  plus ``quotas.sts_max_wait_seconds``).
* A refresh (the L1 already got credentials for the key from here) only
  accepts a value newer than those, so early refreshes and ``min_ttl`` reach
  STS once for the fleet rather than never.
* Redis never fails a request: an error or timeout (each operation is
  bounded by ``operation_timeout_seconds``, in time the event loop spent
  waiting for Redis, see ``broker.credentials.redis``) means calling STS directly,
  counted in ``broker_shared_cache_degraded_total`` and logged as
  ``shared_cache_degraded`` at most every 30 s (``broker.credentials.redis.SharedRedis``).
* Each value key is also listed in its caller's set, ``key_prefix`` +
  ``caller:`` + the ``RoleSessionName`` (living as long as its longest
  value), so ``purge`` deletes a revoked caller's values fleet-wide and
  ``held`` shows them (never their secrets).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from typing import Any

import structlog
from redis.asyncio import Redis

from broker.config import RedisSettings
from broker.credentials.cache import CacheKey, CredentialCache, Fetch
from broker.credentials.redis import SharedCacheUnavailable, SharedRedis
from broker.credentials.sealing import EncryptionKeys, open_sealed, seal
from broker.models import AssumeRoleRequest, Clock, Credentials

__all__ = ["SharedCache", "SharedCredentialCache", "SharedCredentialStore", "SharedEntry"]

log = structlog.get_logger("broker.credentials.shared_store")

_FIRST_POLL_SECONDS = 0.005
_MAX_POLL_SECONDS = 0.05
_MAX_RENEWALS = 100
"""A fetch outliving this many lease renewals (over 5 minutes by default) lets its lock go."""

# Deletes the lock only while it still holds our token: a lock that expired
# and was taken over by another process is not ours to delete.
_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

# Extends the lease only while the lock still holds our token.
_RENEW_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


async def _delete(keys: list[str], client: Redis) -> int:
    return int(await client.delete(*keys))


async def _get_value(key: str, client: Redis) -> bytes | None:
    value = await client.get(key)
    return value if value is None or isinstance(value, bytes) else str(value).encode()


async def _members(key: str, client: Redis) -> set[bytes]:
    members = await client.smembers(key)
    return {m if isinstance(m, bytes) else m.encode() for m in members}


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
class SharedEntry:
    """One value Redis holds for a caller, as the admin channel shows it (no secret)."""

    value_key: str
    access_key_id: str
    expires_at: float


@dataclass(frozen=True, slots=True)
class _Slot:
    """The Redis keys of one ``CacheKey`` (by the sha256 of its fields) and what we last gave."""

    digest: str
    value_key: str
    lock_key: str
    newer_than: float | None  # expires_at of what this process last handed out for the key
    min_expires_at: float = 0.0  # what the caller needs (min_ttl_seconds)
    caller_key: str = ""  # the set of this caller's value keys


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
        wait_seconds: float = 15.0,
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
        self._renew = redis.client.register_script(_RENEW_LUA)

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
            found = self._usable(slot, await self._read_blob(slot))
        except SharedCacheUnavailable:
            return None
        if found is not None:
            self._remember(slot.digest, found)
        return found

    def _slot(self, request: AssumeRoleRequest) -> _Slot:
        fields = CacheKey.for_request(request).parts()
        digest = hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()
        return _Slot(
            digest,
            f"{self._prefix}cred:{digest}",
            f"{self._prefix}lock:{digest}",
            self._handed_out.get(digest),
            request.min_expires_at,
            self._caller_key(request.role_session_name),
        )

    def _caller_key(self, role_session_name: str) -> str:
        return f"{self._prefix}caller:{role_session_name}"

    async def purge(self, session_names: frozenset[str]) -> int:
        """Delete these callers' values and sets; how many values.  Redis errors raise."""
        purged = 0
        for name in sorted(session_names):
            members = await self._members(name)
            keys = [self._caller_key(name), *members]
            deleted: int = await self._redis.run("purge", partial(_delete, keys))
            purged += max(0, deleted - 1)
        return purged

    async def held(self, session_names: frozenset[str]) -> list[SharedEntry]:
        """The values Redis holds for these callers, opened only to show AccessKeyId and expiry."""
        found = []
        for name in sorted(session_names):
            for value_key in sorted(await self._members(name)):
                blob: bytes | None = await self._redis.run("held", partial(_get_value, value_key))
                opened = None if blob is None else self._open(_Slot("", value_key, "", None), blob)
                if opened is not None:
                    found.append(SharedEntry(value_key, opened.access_key_id, opened.expires_at))
        return found

    async def _members(self, role_session_name: str) -> list[str]:
        """The value keys listed in a caller's set."""
        members: set[bytes] = await self._redis.run(
            "members", partial(_members, self._caller_key(role_session_name))
        )
        return [member.decode() for member in members]

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
            blob = await self._read_blob(slot)
            found = self._usable(slot, blob)
            if found is not None:
                return found
            if await self._redis.run("lock", lambda r: self._lock(r, slot, token)):
                return await self._recheck(slot, token, blob)
            remaining = deadline - self._monotonic()
            if remaining <= 0:
                log.warning("shared_cache_wait_expired", wait_seconds=self._wait)
                return None
            await self._sleep(min(delay, remaining))
            delay = min(delay * 2, _MAX_POLL_SECONDS)

    async def _lock(self, client: Redis, slot: _Slot, token: str) -> bool:
        return bool(await client.set(slot.lock_key, token, nx=True, px=self._lock_ms))

    async def _recheck(self, slot: _Slot, token: str, seen: bytes | None) -> Credentials | str:
        """The lock is ours; the last holder may have published just before releasing it."""
        try:
            blob = await self._read_blob(slot)
        except SharedCacheUnavailable:
            return token  # we hold the lock: fetch as its holder
        found = None if blob == seen else self._usable(slot, blob)  # ``seen`` was judged
        if found is None:
            return token
        await self._unlock(slot, token)
        return found

    async def _read_blob(self, slot: _Slot) -> bytes | None:
        blob = await self._redis.run("read", lambda r: r.get(slot.value_key))
        return blob.encode() if isinstance(blob, str) else blob

    def _usable(self, slot: _Slot, blob: bytes | None) -> Credentials | None:
        """The credentials in ``blob`` if they open and are what this caller needs."""
        if blob is None:
            return None
        credentials = self._open(slot, blob)
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
        if token is None:  # a waiter that ran out of time: no lock to keep
            credentials = await fetch(request)
            await self._write(slot, credentials)
            return credentials
        renewing = asyncio.create_task(self._keep_lease(slot, token))
        try:
            credentials = await fetch(request)
            await self._write(slot, credentials)
        finally:
            renewing.cancel()
            await asyncio.wait({renewing})
            await self._unlock(slot, token)
        return credentials

    async def _keep_lease(self, slot: _Slot, token: str) -> None:
        """Renew our lock every third of its TTL until cancelled (Redis TTLs run in real time)."""
        args: list[str | int] = [token, self._lock_ms]
        for _ in range(_MAX_RENEWALS):
            await asyncio.sleep(self._lock_ms / 3000)
            with contextlib.suppress(SharedCacheUnavailable):
                await self._redis.run(
                    "renew", lambda r: self._renew(keys=[slot.lock_key], args=args, client=r)
                )

    async def _write(self, slot: _Slot, credentials: Credentials) -> None:
        ttl_ms = int((credentials.expires_at - self._margin - self._clock()) * 1000)
        if ttl_ms <= 0:
            return  # already inside the margin: never stored
        blob = seal(self._keys, _dump_credentials(credentials), slot.value_key.encode())
        with contextlib.suppress(SharedCacheUnavailable):
            await self._redis.run("write", lambda r: self._set(r, slot, blob, ttl_ms))

    async def _set(self, client: Redis, slot: _Slot, blob: bytes, ttl_ms: int) -> None:
        """The value, and its key in its caller's set (which lives as long as its longest value)."""
        async with client.pipeline(transaction=True) as pipe:
            pipe.set(slot.value_key, blob, px=ttl_ms)
            pipe.sadd(slot.caller_key, slot.value_key)
            pipe.pexpire(slot.caller_key, ttl_ms, nx=True)
            pipe.pexpire(slot.caller_key, ttl_ms, gt=True)
            await pipe.execute()

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
