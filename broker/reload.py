"""Policy reload: parse and validate the whole directory, then swap it in at once.

A broken file (bad YAML, a schema error, a removed file that leaves the set
empty) is reported with its file and line, and the previous set stays in
force.  Edited policies take effect on the next request because the cache key
follows the rendered policy.  Triggered by SIGHUP and, when
``watch_policies`` is on, by changes in ``policies_dir`` (watchfiles, which
also sees a Kubernetes ConfigMap's ``..data`` symlink swap).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog
import watchfiles

from broker.errors import ConfigError
from broker.policies import load_policies
from broker.services import Services

__all__ = ["reload_policies", "watch_policies"]

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
        outcome = reload_policies(services)
        if reloaded is not None:
            reloaded(outcome)
