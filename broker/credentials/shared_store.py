"""Shared credential cache on Redis: AES-GCM sealed values and a fleet-wide single flight.

With ``cache.backend: redis`` every process keeps its in-process cache
(``broker.credentials.cache.CredentialCache``, the L1) and, behind it, this store.
Rules, each pinned by tests/test_shared_cache.py:

* A value is the credentials as JSON, sealed with AES-256-GCM under the
  active key and a random 96-bit nonce, in the envelope
  ``{"v": 1, "kid": KEY_ID, "n": NONCE, "c": CIPHERTEXT}`` (base64).  The
  Redis key is the associated data, so a value copied to another key does
  not open.  Any configured key opens a value: rotate by adding a key and
  making it active; drop the old one once the longest token lifetime has
  passed.  A value that does not open (tampered, moved, unknown key) is a miss.
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
import base64
import binascii
import contextlib
import dataclasses
import hashlib
import json
import os
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import pydantic
import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BeforeValidator, ConfigDict, Field
from redis.asyncio import Redis

from broker.config import RedisSettings, Settings
from broker.credentials.cache import CacheKey, CredentialCache, Fetch
from broker.credentials.redis import SharedCacheUnavailable, SharedRedis, connect_redis
from broker.errors import ConfigError
from broker.metrics import Metrics
from broker.models import AssumeRoleRequest, Clock, Credentials

__all__ = [
    "EncryptionKeys",
    "SharedCache",
    "SharedCredentialCache",
    "SharedCredentialStore",
    "connect_shared_cache",
    "load_encryption_keys",
    "open_sealed",
    "seal",
]

log = structlog.get_logger("broker.credentials.shared_store")

_ENVELOPE_VERSION = 1
_NONCE_BYTES = 12
_KEY_BYTES = 32
_KEY_ID = r"^[A-Za-z0-9._-]{1,64}$"
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


def _decode_key(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")  # never echo key material
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError("is not valid base64") from err
    if len(raw) != _KEY_BYTES:
        raise ValueError(f"must be {_KEY_BYTES} bytes (AES-256), base64-encoded")
    return raw


class _KeysDocument(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    active: str = Field(pattern=_KEY_ID)
    keys: dict[
        Annotated[str, Field(pattern=_KEY_ID)], Annotated[bytes, BeforeValidator(_decode_key)]
    ] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class EncryptionKeys:
    """AES-256-GCM keys by id: ``active`` seals new values, any of them opens one."""

    active: str
    keys: Mapping[str, bytes] = field(repr=False)
    _ciphers: Mapping[str, AESGCM] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise ValueError(f"active key {self.active!r} is not among the keys")
        if any(len(key) != _KEY_BYTES for key in self.keys.values()):
            raise ValueError(f"every key must be {_KEY_BYTES} bytes")
        ciphers = {kid: AESGCM(key) for kid, key in self.keys.items()}
        object.__setattr__(self, "_ciphers", ciphers)

    @classmethod
    def parse(cls, text: str, source: str) -> EncryptionKeys:
        """Keys from the JSON ``{"active": ID, "keys": {ID: base64}}``; ``ConfigError`` if bad."""
        try:
            doc = _KeysDocument.model_validate_json(text)
        except pydantic.ValidationError as err:
            raise ConfigError(_key_problems(source, err)) from None  # no key material in errors
        if doc.active not in doc.keys:
            raise ConfigError([f"{source}: active: key {doc.active!r} is not in keys"])
        return cls(doc.active, dict(doc.keys))

    def cipher(self, kid: str) -> AESGCM | None:
        """The cipher of key ``kid``, if configured."""
        return self._ciphers.get(kid)

    def active_cipher(self) -> AESGCM:
        """The cipher of the active key, which seals every new value."""
        return self._ciphers[self.active]


def _key_problems(source: str, err: pydantic.ValidationError) -> list[str]:
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in item["loc"]) or "(document)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "json_invalid":
            message = 'is not valid JSON (want {"active": ID, "keys": {ID: base64}})'
        problems.append(f"{source}: {where}: {message}")
    return problems


def load_encryption_keys(
    settings: RedisSettings,
    *,
    config_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> EncryptionKeys:
    """The keys from ``encryption_keys_file`` (relative to ``config_dir``) or the environment."""
    environ = os.environ if environ is None else environ
    if settings.encryption_keys_env is not None:
        name = settings.encryption_keys_env
        source = f"cache.redis.encryption_keys_env ({name})"
        if not environ.get(name):
            raise ConfigError([f"{source}: environment variable {name} is not set"])
        return EncryptionKeys.parse(environ[name], source)
    path = settings.encryption_keys_file
    if path is None:  # RedisSettings insists on exactly one source
        raise ConfigError(["cache.redis: no encryption keys configured"])
    if not path.is_absolute() and config_dir is not None:
        path = config_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        problem = f"cannot read file ({type(err).__name__})"
        raise ConfigError([f"{path}: {problem}"]) from err
    return EncryptionKeys.parse(text, str(path))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal(keys: EncryptionKeys, plaintext: bytes, associated_data: bytes) -> bytes:
    """``plaintext`` encrypted under the active key with a fresh nonce, as a JSON envelope."""
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = keys.active_cipher().encrypt(nonce, plaintext, associated_data)
    envelope = {"v": _ENVELOPE_VERSION, "kid": keys.active, "n": _b64(nonce), "c": _b64(ciphertext)}
    return json.dumps(envelope, separators=(",", ":")).encode()


def open_sealed(keys: EncryptionKeys, envelope: bytes, associated_data: bytes) -> bytes:
    """The plaintext of ``envelope``; ``ValueError`` naming the reason if it does not open."""
    try:
        doc = json.loads(envelope)
        version, kid, nonce, ciphertext = doc["v"], doc["kid"], doc["n"], doc["c"]
        nonce_bytes = base64.b64decode(nonce, validate=True)
        ciphertext_bytes = base64.b64decode(ciphertext, validate=True)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError("malformed envelope") from err
    if version != _ENVELOPE_VERSION or len(nonce_bytes) != _NONCE_BYTES:
        raise ValueError("unsupported envelope")
    cipher = keys.cipher(kid) if isinstance(kid, str) else None
    if cipher is None:
        raise ValueError("unknown key id")
    try:
        return cipher.decrypt(nonce_bytes, ciphertext_bytes, associated_data)
    except InvalidTag as err:
        raise ValueError("authentication failed") from err


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
    redis = connect_redis(redis_settings, metrics, environ)
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
