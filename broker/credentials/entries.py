"""Where the credential cache keeps its entries, and the timer that purges them on time."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from cachetools import Cache, TLRUCache

from broker.models import Clock, Credentials

if TYPE_CHECKING:  # cache.py imports this module; these names are only annotations here
    from broker.credentials.cache import CacheKey, CacheStats

__all__ = ["CallLater", "Cancellable", "Entries", "Entry", "Purge"]


class Cancellable(Protocol):
    """What ``call_later`` returns: a pending callback that can be cancelled."""

    def cancel(self) -> None: ...


CallLater = Callable[[float, Callable[[], None]], Cancellable]
"""``loop.call_later``'s shape: run a callback after a delay (seconds), cancellable."""


@dataclass(slots=True)
class Entry:
    """One cached set of credentials, when it stops being served and when to refresh it."""

    credentials: Credentials
    serve_until: float
    refresh_at: float


def _serve_until(key: CacheKey, entry: Entry, now: float) -> float:
    return entry.serve_until


class Entries(TLRUCache["CacheKey", Entry]):
    """Entries that expire when their serving window ends; LRU evictions are counted."""

    def __init__(self, max_entries: int, clock: Clock, stats: CacheStats) -> None:
        super().__init__(max_entries, ttu=_serve_until, timer=clock)
        self._stats = stats

    def popitem(self) -> tuple[CacheKey, Entry]:
        item = super().popitem()  # only ever the least recently used, unexpired entry
        self._stats.evictions += 1
        return item

    def lookup(self, key: CacheKey) -> Entry | None:
        """The entry for ``key`` unless its serving window has ended (one reading of the clock)."""
        try:
            return self[key]  # ``get`` would read the clock twice: ``in``, then ``[]``
        except KeyError:
            return None

    def held(self) -> int:
        """Entries in memory, expired or not (``len()`` would purge first)."""
        return Cache.__len__(self)

    def held_for(self, session_names: frozenset[str]) -> list[tuple[CacheKey, Entry]]:
        """Every entry in memory (expired or not) of these callers' ``RoleSessionName``."""
        return [
            (key, Cache.__getitem__(self, key))
            for key in list(Cache.__iter__(self))
            if key.role_session_name in session_names
        ]

    def drop(self, key: CacheKey) -> None:
        """Remove ``key`` now, expired or not."""
        with contextlib.suppress(KeyError):  # TLRUCache removes, then raises if expired
            del self[key]


class Purge:
    """Wakes the loop when the earliest serving window ends, to drop what has expired.

    A ``TLRUCache`` only expires on access; this makes sure an entry leaves
    memory on time even if nobody asks for it again.  Wake-ups are whole
    seconds of the clock, without repeats, so there are never more of them
    than seconds in the longest token lifetime.
    """

    def __init__(self, entries: Entries, clock: Clock, call_later: CallLater | None) -> None:
        self._entries = entries
        self._clock = clock
        self._call_later = call_later
        self._due: list[int] = []  # a heap
        self._pending: set[int] = set()
        self._timer: Cancellable | None = None
        self._timer_at: int | None = None

    def schedule(self, at: float) -> None:
        """Make sure the loop wakes at ``at`` (clock time, rounded up to a whole second)."""
        second = math.ceil(at)
        if second not in self._pending:
            self._pending.add(second)
            heapq.heappush(self._due, second)
        if self._timer_at is None or second < self._timer_at:
            self._arm(second)

    def run(self) -> None:
        """Drop every expired entry, then wait for the next serving window to end."""
        self._timer = self._timer_at = None
        now = self._clock()
        self._entries.expire(now)
        while self._due and self._due[0] <= now:
            self._pending.discard(heapq.heappop(self._due))
        if self._due:
            self._arm(self._due[0])

    def cancel(self) -> None:
        """Stop waking up (on close)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self._timer_at = None

    def _arm(self, second: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        call_later = self._call_later or asyncio.get_running_loop().call_later
        self._timer = call_later(max(0.0, second - self._clock()), self.run)
        self._timer_at = second
