"""Policy and auth reload: parse and validate off the event loop, then swap it in at once.

A broken file (bad YAML, a schema error, a removed file that leaves the set
empty) is reported with its file and line, and the previous set stays in
force.  Edited policies take effect on the next request because the cache key
follows the rendered policy.  Triggered by SIGHUP and, when
``watch_policies`` is on, by changes in ``policies_dir`` (watchfiles, which
also sees a Kubernetes ConfigMap's ``..data`` symlink swap).

Reading and validating hundreds of files takes a second or more, so it runs
in a worker thread (``asyncio.to_thread``) while the event loop keeps
answering requests with the old set; only the swap, one assignment, happens
on the loop.  Reloads of one ``PolicyReloader`` run one at a time, so an
older directory snapshot never replaces a newer one.

The ``auth`` section of the configuration file (API keys, JWT settings, the
``revoked`` deny list) reloads with the policies, keep-last-good the same way:
a broken file keeps the previous authenticator and is reported.  Callers newly
revoked, or whose key left the file, have their cached credentials purged
(``broker.revocation``).  Other sections need a restart.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

from broker.auth import Revocations
from broker.config import Settings, load_settings
from broker.errors import ConfigError
from broker.policies import PolicySet, load_policies
from broker.revocation import start_purge
from broker.services import Services, build_authenticator

__all__ = [
    "PolicyReloader",
    "reload",
    "reload_auth",
    "reload_policies",
    "watch_policies",
]

log = structlog.get_logger("broker.reload")

_DEBOUNCE_MS = 300
_IDLE_MS = 500
"""How long the watcher waits for a change before it reports that it is idle (and running)."""

Loader = Callable[[Path], PolicySet]


class PolicyReloader:
    """Reloads policies (parsed in a worker thread) and, with ``auth``, the auth section."""

    def __init__(
        self, services: Services, *, load: Loader = load_policies, auth: bool = True
    ) -> None:
        self._services = services
        self._load = load
        self._auth = auth
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[bool]] = set()

    async def reload(self) -> bool:
        """Load every policy file (and the auth section) and swap in; keep the old on any error."""
        services = self._services
        async with self._lock:
            try:
                fresh = await asyncio.to_thread(self._load, services.settings.policies_dir)
            except ConfigError as err:
                fresh = None
                _policies_failed(services, err)
            if fresh is not None:
                _swap_policies(services, fresh)  # on the loop: requests see old or new
            auth_ok = reload_auth(services) if self._auth else True
        return fresh is not None and auth_ok

    def reload_soon(self) -> asyncio.Task[bool]:
        """Start a reload in the background (for a signal handler, which cannot await)."""
        task = asyncio.get_running_loop().create_task(self.reload())
        self._pending.add(task)  # a reference until it is done, so it is not collected
        task.add_done_callback(self._pending.discard)
        return task

    async def watch(
        self,
        *,
        ready: asyncio.Event | None = None,
        reloaded: Callable[[bool], object] | None = None,
    ) -> None:
        """Reload whenever something in ``policies_dir`` changes, until cancelled.

        ``ready`` is set once the directory is being watched (changes from then on
        are seen); ``reloaded`` is called with each reload's outcome.
        """
        directory = self._services.settings.policies_dir
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
            outcome = await self.reload()
            if reloaded is not None:
                reloaded(outcome)


def _policies_failed(services: Services, err: ConfigError) -> None:
    log.error("policies_reload_failed", problems=err.problems)
    services.metrics.record_reload(successful=False, at=services.clock())


def _swap_policies(services: Services, fresh: PolicySet) -> None:
    services.policies = fresh
    services.metrics.record_reload(successful=True, at=services.clock(), policies=len(fresh))
    log.info("policies_reloaded", policies=len(fresh), digest=fresh.digest[:16])


async def reload_policies(services: Services) -> bool:
    """Reload the policies once, off the loop (a running broker shares one ``PolicyReloader``)."""
    return await PolicyReloader(services, auth=False).reload()


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
    """Reload policies, then the auth section, on the caller's thread (tests, tools).

    A running broker uses ``PolicyReloader`` instead, which parses off the event loop.
    """
    try:
        fresh = load_policies(services.settings.policies_dir)
    except ConfigError as err:
        _policies_failed(services, err)
        return reload_auth(services) and False
    _swap_policies(services, fresh)
    return reload_auth(services)


async def watch_policies(
    services: Services,
    *,
    ready: asyncio.Event | None = None,
    reloaded: Callable[[bool], object] | None = None,
) -> None:
    """Reload whenever something in ``policies_dir`` changes (``PolicyReloader.watch``)."""
    await PolicyReloader(services).watch(ready=ready, reloaded=reloaded)
