"""Policy and auth reload: parse and validate everything, then swap it in at once.

A broken file (bad YAML, a schema error, a removed file that leaves the set
empty) is reported with its file and line, and the previous set stays in
force.  Edited policies take effect on the next request because the cache key
follows the rendered policy.  Triggered by SIGHUP and, when
``watch_policies`` is on, by changes in ``policies_dir`` (watchfiles, which
also sees a Kubernetes ConfigMap's ``..data`` symlink swap).

The ``auth`` section of the configuration file (API keys, JWT settings, the
``revoked`` deny list) reloads with them, keep-last-good the same way: a
broken file keeps the previous authenticator and is reported.  Callers newly
revoked, or whose key left the file, have their cached credentials purged
(``broker.revocation``).  Other sections need a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
import watchfiles

from broker.auth import Revocations
from broker.config import Settings, load_settings
from broker.errors import ConfigError
from broker.policies import load_policies
from broker.revocation import start_purge
from broker.services import Services, build_authenticator

__all__ = ["reload", "reload_auth", "reload_policies", "watch_policies"]

log = structlog.get_logger("broker.reload")

_DEBOUNCE_MS = 300
_IDLE_MS = 500
"""How long the watcher waits for a change before it reports that it is idle (and running)."""


def reload_policies(services: Services) -> bool:
    """Load every policy file and swap the set in; keep the old set on any error."""
    try:
        fresh = load_policies(services.settings.policies_dir)
    except ConfigError as err:
        log.error("policies_reload_failed", problems=err.problems)
        services.metrics.record_reload(successful=False, at=services.clock())
        return False
    services.policies = fresh
    services.metrics.record_reload(successful=True, at=services.clock(), policies=len(fresh))
    log.info("policies_reloaded", policies=len(fresh), digest=fresh.digest[:16])
    return True


def reload_auth(services: Services) -> bool:
    """Reload the ``auth`` section of the configuration file; keep the old one on any error."""
    source = services.settings.source
    if source is None:
        return True  # built in code (tests, dev): nothing to reread
    try:
        fresh = load_settings(source)
        authenticator = build_authenticator(fresh, services.clock, services.revoked_at_runtime)
    except ConfigError as err:
        log.error("auth_reload_failed", problems=err.problems)
        services.metrics.record_reload(successful=False, at=services.clock())
        return False
    gone = _no_longer_admitted(services.settings, fresh)
    services.settings = services.settings.model_copy(update={"auth": fresh.auth})
    services.authenticator = authenticator
    start_purge(services, gone)
    log.info(
        "auth_reloaded",
        revoked_callers=len(authenticator.revoked.callers),
        revoked_subjects=len(authenticator.revoked.subjects),
    )
    return True


def _no_longer_admitted(before: Settings, after: Settings) -> Revocations:
    """Callers newly revoked by ``after``, and ids whose key or certificate left the file."""
    old, new = before.auth, after.auth
    ids_before = {key.id for key in old.api_keys} | {caller.id for caller in old.mtls}
    ids_after = {key.id for key in new.api_keys} | {caller.id for caller in new.mtls}
    callers = (set(new.revoked.callers) - set(old.revoked.callers)) | (ids_before - ids_after)
    subjects = set(new.revoked.subjects) - set(old.revoked.subjects)
    return Revocations(frozenset(callers), frozenset(subjects))


def reload(services: Services) -> bool:
    """Reload policies, then the ``auth`` section; each keeps its previous version on error."""
    policies_ok = reload_policies(services)
    return reload_auth(services) and policies_ok


async def watch_policies(
    services: Services,
    *,
    ready: asyncio.Event | None = None,
    reloaded: Callable[[bool], object] | None = None,
) -> None:
    """Reload whenever something in ``policies_dir`` changes, until cancelled.

    ``ready`` is set once the directory is being watched (changes from then on
    are seen); ``reloaded`` is called with each reload's outcome.
    """
    directory = services.settings.policies_dir
    changes_seen = watchfiles.awatch(
        directory,
        debounce=_DEBOUNCE_MS,
        recursive=True,
        rust_timeout=_IDLE_MS,
        yield_on_timeout=True,  # an empty set now and then: proof the watcher is running
    )
    started = False
    async for changes in changes_seen:
        if not started:
            started = True
            log.info("policies_watch_started", directory=str(directory))
            if ready is not None:
                ready.set()
        if not changes:
            continue
        log.info("policies_changed", changes=len(changes))
        outcome = reload(services)
        if reloaded is not None:
            reloaded(outcome)
