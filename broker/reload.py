"""Policy reload: parse and validate the whole directory off the event loop, then swap it in.

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
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import structlog
import watchfiles

from broker.errors import ConfigError
from broker.policies import PolicySet, load_policies
from broker.services import Services

__all__ = ["PolicyReloader", "reload_policies", "watch_policies"]

log = structlog.get_logger("broker.reload")

_DEBOUNCE_MS = 300
_IDLE_MS = 500
"""How long the watcher waits for a change before it reports that it is idle (and running)."""

Loader = Callable[[Path], PolicySet]


class PolicyReloader:
    """Reloads ``services.policies``: one reload at a time, each parsed in a worker thread."""

    def __init__(self, services: Services, *, load: Loader = load_policies) -> None:
        self._services = services
        self._load = load
        self._lock = asyncio.Lock()
        self._pending: set[asyncio.Task[bool]] = set()

    async def reload(self) -> bool:
        """Load every policy file and swap the set in; keep the old set on any error."""
        services = self._services
        async with self._lock:
            try:
                fresh = await asyncio.to_thread(self._load, services.settings.policies_dir)
            except ConfigError as err:
                log.error("policies_reload_failed", problems=err.problems)
                services.metrics.record_reload(successful=False, at=services.clock())
                return False
            services.policies = fresh  # on the loop: requests see the old set or the new one
        services.metrics.record_reload(successful=True, at=services.clock(), policies=len(fresh))
        log.info("policies_reloaded", policies=len(fresh), digest=fresh.digest[:16])
        return True

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


async def reload_policies(services: Services) -> bool:
    """Reload once (``PolicyReloader.reload``); a running broker shares one ``PolicyReloader``."""
    return await PolicyReloader(services).reload()


async def watch_policies(
    services: Services,
    *,
    ready: asyncio.Event | None = None,
    reloaded: Callable[[bool], object] | None = None,
) -> None:
    """Watch ``policies_dir`` with a reloader of its own (``PolicyReloader.watch``)."""
    await PolicyReloader(services).watch(ready=ready, reloaded=reloaded)
