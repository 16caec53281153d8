"""Revocation: refuse callers at once and purge their cached credentials, here and fleet-wide.

A revoked caller is refused at authentication (``broker.auth.Revocations``),
so it cannot reach a cache.  Its entries are still purged so no secret of
theirs stays in memory: this process's L1 at once, then (``cache.backend:
redis``) the values in Redis, and a message on the channel ``key_prefix`` +
``revocations`` tells every other replica to refuse the caller and drop its
L1 entries too, before it has reloaded the same deny list.

STS tokens already handed out cannot be revoked at the cloud: they stay valid
until their ``Expiration`` (docs/deployment.md, "Revocation").
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass

import structlog
from redis.exceptions import RedisError

from broker.auth import Revocations, revoked_session_names
from broker.credentials.redis import SharedCacheUnavailable
from broker.credentials.shared_store import SharedCache, SharedCredentialCache
from broker.services import Services

__all__ = ["PurgeReport", "listen_for_revocations", "purge", "revoke", "start_purge"]

log = structlog.get_logger("broker.revocation")

_LISTEN_TIMEOUT_SECONDS = 1.0
_RECONNECT_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class PurgeReport:
    """Entries a purge removed: from memory, from Redis (None: no Redis, or it failed)."""

    memory: int
    redis: int | None


def _shared(services: Services) -> SharedCache | None:
    cache = services.cache
    return cache.shared if isinstance(cache, SharedCredentialCache) else None


async def purge(
    services: Services, revoked: Revocations, *, announce: bool = True, refuse: bool = False
) -> PurgeReport:
    """Drop the entries of ``revoked`` from memory and Redis; tell the other replicas.

    With ``refuse`` the other replicas also refuse these callers at once
    (the admin channel); without it (a reload) they purge their L1 and learn
    the deny list from their own reload of the same file.
    """
    names = revoked_session_names(revoked)
    memory = services.cache.purge(names)
    shared = _shared(services)
    purged_in_redis = None
    if shared is not None:
        with contextlib.suppress(SharedCacheUnavailable):
            purged_in_redis = await shared.store.purge(names)
        if announce:
            await _announce(shared, revoked, refuse=refuse)
    log.warning("caller_purged", callers=sorted(names), memory=memory, redis=purged_in_redis)
    return PurgeReport(memory, purged_in_redis)


async def revoke(services: Services, revoked: Revocations) -> PurgeReport:
    """Refuse ``revoked`` from now on (until restart: add it to ``auth.revoked``) and purge."""
    services.revoked_at_runtime = services.revoked_at_runtime | revoked
    services.authenticator.revoked = services.authenticator.revoked | revoked
    return await purge(services, revoked, refuse=True)


def start_purge(services: Services, revoked: Revocations) -> asyncio.Task[object] | None:
    """Purge from a signal handler: L1 now, Redis in a task kept in ``services.background``."""
    if not revoked.callers and not revoked.subjects:
        return None
    services.cache.purge(revoked_session_names(revoked))  # memory at once, before any await
    task: asyncio.Task[object] = asyncio.get_running_loop().create_task(purge(services, revoked))
    services.background.add(task)
    task.add_done_callback(services.background.discard)
    return task


def _channel(shared: SharedCache) -> str:
    return f"{shared.settings.key_prefix}revocations"


async def _announce(shared: SharedCache, revoked: Revocations, *, refuse: bool) -> None:
    message = json.dumps(
        {
            "refuse": refuse,
            "callers": sorted(revoked.callers),
            "subjects": sorted(revoked.subjects),
        }
    )
    with contextlib.suppress(SharedCacheUnavailable):
        await shared.redis.run("announce", lambda r: r.publish(_channel(shared), message))


async def listen_for_revocations(
    services: Services,
    *,
    ready: asyncio.Event | None = None,
    applied: Callable[[Revocations], object] | None = None,
) -> None:
    """Apply the revocations replicas announce (its own too: idempotent), until cancelled.

    Only with ``cache.backend: redis``; returns at once otherwise.

    ``ready`` is set once subscribed; ``applied`` is called after each message is applied.
    """
    shared = _shared(services)
    if shared is None:
        return
    while True:
        try:
            await _listen(services, shared, ready, applied)
        except (RedisError, OSError) as err:  # TimeoutError is an OSError
            log.warning("revocation_listener_failed", error=type(err).__name__, detail=str(err))
        await asyncio.sleep(_RECONNECT_SECONDS)


async def _listen(
    services: Services,
    shared: SharedCache,
    ready: asyncio.Event | None,
    applied: Callable[[Revocations], object] | None,
) -> None:
    async with shared.redis.client.pubsub(ignore_subscribe_messages=True) as pubsub:
        await pubsub.subscribe(_channel(shared))
        log.info("revocation_listener_subscribed", channel=_channel(shared))
        if ready is not None:
            ready.set()
        while True:
            message = await pubsub.get_message(timeout=_LISTEN_TIMEOUT_SECONDS)
            revoked = None if message is None else await _apply(services, message.get("data"))
            if revoked is not None and applied is not None:
                applied(revoked)


async def _apply(services: Services, data: object) -> Revocations | None:
    try:
        doc = json.loads(data if isinstance(data, (bytes, str)) else b"")
        revoked = Revocations(frozenset(doc["callers"]), frozenset(doc["subjects"]))
        refuse = doc["refuse"] is True
    except (ValueError, KeyError, TypeError):
        log.warning("revocation_message_rejected")
        return None
    if refuse:
        services.revoked_at_runtime = services.revoked_at_runtime | revoked
        services.authenticator.revoked = services.authenticator.revoked | revoked
    await purge(services, revoked, announce=False)
    return revoked
