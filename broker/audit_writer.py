"""The audit trail's writer: lines → a bounded queue → one thread → the sink.  Never blocks.

``broker.audit`` renders records and decides what waits for them; this module
only writes: everything queued in one ``write(2)`` (a group commit), results
handed back to the loop each batch came from.  Apart from the log's writer on
purpose: the audit trail has its own sink, bound and failure accounting, and
in ``audit.mode: required`` callers that wait for the outcome.
"""

from __future__ import annotations

import asyncio
import errno
import os
import select
import stat
import threading
import weakref
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path

from broker.errors import ConfigError

__all__ = ["AuditWriter", "Entry", "Settle", "open_file"]

_IDLE_SECONDS = 30.0
"""The writer thread exits after this long without a record (a new one starts it again)."""

Entry = tuple[bytes, str | None, asyncio.Future[str | None] | None]
"""A rendered line, its event (``None``: a flush marker) and who waits for the outcome."""
Settle = Callable[[Sequence[Entry], str | None], None]


class AuditWriter:
    """Lines → a bounded queue → one writer thread → the sink's file descriptor.

    ``submit`` never blocks.  The thread writes everything queued in one
    ``write(2)`` (a group commit), then hands the batch back to the loop it
    came from through ``settle`` with ``None`` or the error's name.  The
    descriptor is in append mode, so several processes may share one file;
    ``replace_fd`` switches to a new one between two writes (log rotation).
    """

    def __init__(self, fd: int, *, owns_fd: bool, max_buffer_bytes: int, fsync: bool) -> None:
        self._fds = [fd]  # the current descriptor, then one that replaces it
        # Closes them once: at close(), or when the writer is dropped unclosed.
        self._release = weakref.finalize(self, _close_all, self._fds) if owns_fd else None
        self._max = max_buffer_bytes
        self._fsync = fsync and stat.S_ISREG(os.fstat(fd).st_mode)
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._queue: deque[tuple[Settle, list[Entry]]] = deque()
        self._buffered = 0
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def closed(self) -> bool:
        """Whether ``close`` was called: nothing more is accepted."""
        return self._closed

    def submit(self, entries: list[Entry], settle: Settle) -> list[Entry]:
        """Queue the entries that fit in the buffer, in order; those that did not are returned."""
        with self._lock:
            room = 0 if self._closed else self._max - self._buffered
            size = fitting = 0
            for line, _, _ in entries:
                if size + len(line) > room:
                    break
                size += len(line)
                fitting += 1
            if fitting:
                self._enqueue(entries[:fitting], size, settle)
        return entries[fitting:]

    def write_now(self, entries: list[Entry]) -> str | None:
        """Write in the calling thread (no running loop, or closed); the error's name or None."""
        return _write_all(self._fds[0], b"".join(line for line, _, _ in entries), self._fsync)

    def replace_fd(self, fd: int) -> None:
        """Write to ``fd`` from the next batch on and close the current descriptor then."""
        with self._lock:
            if self._closed:
                os.close(fd)
                return
            if len(self._fds) > 1:  # replaced twice before a write: the newer one wins
                os.close(self._fds.pop())
            self._fds.append(fd)
            if self._thread is None:  # no write can be in progress
                self._swap()

    def close(self) -> None:
        """Stop the thread once its queue is written (call after a flush), then close the sink."""
        with self._lock:
            self._closed = True
            if self._thread is None:
                self._swap()
            self._wake.notify()
            thread = self._thread
        if thread is not None:
            thread.join(timeout=1.0)  # a wedged write must not hold up shutdown
        if self._release is not None and (thread is None or not thread.is_alive()):
            self._release()

    def _enqueue(self, entries: list[Entry], size: int, settle: Settle) -> None:
        self._queue.append((settle, entries))
        self._buffered += size
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="audit-writer", daemon=True)
            self._thread.start()
        else:
            self._wake.notify()

    def _swap(self) -> None:
        """Under the lock, between writes: the replacing descriptor becomes the current one."""
        if len(self._fds) > 1:
            os.close(self._fds.pop(0))

    def _run(self) -> None:
        while batches := self._next_batches():
            lines = [line for _, entries in batches for line, _, _ in entries]
            error = _write_all(self._fds[0], b"".join(lines), self._fsync)
            with self._lock:
                self._buffered -= sum(len(line) for line in lines)
            for settle, entries in batches:
                settle(entries, error)

    def _next_batches(self) -> list[tuple[Settle, list[Entry]]]:
        """Everything queued; empty (and the thread gone) once idle or closed."""
        with self._lock:
            if not self._queue and not self._closed:
                self._wake.wait(_IDLE_SECONDS)
            self._swap()
            if not self._queue:
                self._thread = None
                return []
            batches = list(self._queue)
            self._queue.clear()
            return batches


def _close_all(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)
    fds.clear()


def _write_all(fd: int, data: bytes, fsync: bool) -> str | None:
    """Write ``data`` whole (and fsync it); the error's name on failure, else ``None``."""
    view = memoryview(data)
    try:
        while view:
            try:
                view = view[os.write(fd, view) :]
            except BlockingIOError:  # a non-blocking descriptor shared with someone else
                select.select([], [fd], [], 1.0)
        if fsync:
            os.fsync(fd)
    except OSError as err:
        return errno.errorcode.get(err.errno or 0, type(err).__name__)
    return None


def open_file(path: Path) -> int:
    """``path`` opened for appending (created 0600); ``ConfigError`` if it cannot be."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    try:
        return os.open(path, flags, 0o600)
    except OSError as err:
        raise ConfigError([f"audit.sink: cannot open {path}: {err.strerror}"]) from err
