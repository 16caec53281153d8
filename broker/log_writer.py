"""The log writer: lines → a bounded buffer → one writer thread → stderr.  Never blocks.

``broker.logs.configure_logging(background=True)`` installs one ``LogSink`` per
process.  A slow or blocked stream (stderr a pipe nobody reads, a stalled log
collector) fills the buffer; past its bound new lines are dropped and counted
(``lines_dropped``, exported as ``broker_log_lines_dropped_total``), and once
the stream drains a ``log_lines_dropped`` line says how many were lost.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TextIO

import structlog

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "LogSink",
    "LoopBatchedLogger",
    "SinkHandler",
    "buffered_bytes",
    "install_sink",
    "lines_dropped",
]

DEFAULT_BUFFER_BYTES = 1024 * 1024


class _DropCounter:
    """Lines dropped by every sink of this process (monotonic across reconfigurations)."""

    def __init__(self) -> None:
        self.dropped = 0
        self.sink: LogSink | None = None


_COUNTS = _DropCounter()


def lines_dropped() -> int:
    """Log lines this process could not write and dropped (``broker_log_lines_dropped_total``)."""
    return _COUNTS.dropped


def buffered_bytes() -> int:
    """Characters waiting in the active sink's buffer (0 without one)."""
    sink = _COUNTS.sink
    return sink.buffered if sink is not None else 0


class LogSink:
    """Log lines → a bounded buffer → one writer thread → the stream.  ``write`` never blocks.

    A slow or blocked stream fills the buffer; past ``max_buffer_bytes`` new
    lines are dropped and counted, and once the stream drains again
    ``on_recovered`` is told how many were lost (the CLI logs
    ``log_lines_dropped``).  Writes go to the stream's file descriptor when it
    has one, so a writer stuck in ``write(2)`` holds no Python-level lock.

    ``write`` returns ``False`` for a dropped line.  Audit records do not
    travel this sink: they have their own writer (``broker.audit_writer``).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
        on_recovered: Callable[[int], None] | None = None,
    ) -> None:
        self._stream = stream
        self._fd = _writable_fd(stream)
        self._max = max_buffer_bytes
        self._on_recovered = on_recovered
        self._flushers: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._has_lines = threading.Condition(self._lock)
        self._drained = threading.Condition(self._lock)
        self._queue: deque[tuple[str, int]] = deque()
        self._buffered = 0
        self._unreported = 0
        self._closing = False
        self._thread = threading.Thread(target=self._run, name="log-writer", daemon=True)
        self._thread.start()

    @property
    def buffered(self) -> int:
        """Characters queued or being written."""
        return self._buffered

    def write(self, text: str, lines: int = 1) -> bool:
        """Queue ``text`` (``lines`` complete lines); ``False`` if it was dropped instead."""
        with self._lock:
            if self._closing or self._buffered + len(text) > self._max:
                self._count_dropped(lines)
                return False
            self._queue.append((text, lines))
            self._buffered += len(text)
            self._has_lines.notify()
        return True

    def flush(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for everything queued to be written."""
        for hand_over in self._flushers:
            hand_over()
        with self._lock:
            return self._drained.wait_for(lambda: self._buffered == 0, timeout)

    @property
    def capacity(self) -> int:
        """The buffer's bound, in characters (``max_buffer_bytes``)."""
        return self._max

    def before_close(self, flush: Callable[[], None]) -> None:
        """Have ``close`` call ``flush`` first (a writer holding lines back hands them over)."""
        self._flushers.append(flush)

    def close(self, timeout: float = 2.0) -> None:
        """Write what is queued, then stop the writer; wait at most about ``timeout`` seconds.

        Lines still queued after that (the stream is blocked) are lost.
        """
        deadline = time.monotonic() + timeout
        self.flush(timeout)
        with self._lock:
            self._closing = True
            self._has_lines.notify()
        self._thread.join(max(0.0, deadline - time.monotonic()))

    def _count_dropped(self, lines: int) -> None:
        _COUNTS.dropped += lines
        self._unreported += lines

    def _run(self) -> None:
        while True:
            with self._lock:
                self._has_lines.wait_for(lambda: bool(self._queue) or self._closing)
                if not self._queue:
                    return
                batch = list(self._queue)
                self._queue.clear()
            written = self._emit("".join(text for text, _ in batch))
            self._after_batch(batch, written)

    def _after_batch(self, batch: list[tuple[str, int]], written: bool) -> None:
        with self._lock:
            self._buffered -= sum(len(text) for text, _ in batch)
            if not written:
                self._count_dropped(sum(lines for _, lines in batch))
            report = self._unreported if written and not self._queue else 0
            self._unreported -= report
            self._drained.notify_all()
        if report and self._on_recovered is not None:
            self._on_recovered(report)

    def _emit(self, text: str) -> bool:
        try:
            if self._fd is None:
                self._stream.write(text)
                self._stream.flush()
            else:
                _write_all(self._fd, text.encode("utf-8", "replace"))
        except (OSError, ValueError):  # the reader went away (EPIPE) or the stream closed
            return False
        return True


def _writable_fd(stream: TextIO) -> int | None:
    """The stream's file descriptor after flushing its Python buffer, or ``None``."""
    try:
        fd = stream.fileno()
        stream.flush()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    return fd


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BlockingIOError:  # someone set O_NONBLOCK on the shared descriptor
            select.select([], [fd], [], 1.0)


class LoopBatchedLogger:
    """structlog's logger for a ``LogSink``: lines gathered on the loop, handed over every 10 ms.

    Each hand-over wakes the writer thread, which then competes with the loop
    for the GIL; handing over once per loop iteration cost a busy broker about
    as much as rendering its lines.  So a loop's lines are kept for at most
    ``FLUSH_SECONDS`` (or until ``FLUSH_LINES`` lines or an eighth of the sink's
    buffer, at most ``FLUSH_BYTES``, have gathered) and handed over together.
    Outside a running loop (other threads, start-up, exit) a line goes to the
    sink at once; lines still gathered when the sink closes (the loop ended
    first) are handed over then.
    """

    FLUSH_SECONDS = 0.01
    FLUSH_LINES = 512
    FLUSH_BYTES = 64 * 1024

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink
        # A batch is written (or dropped) whole: keep it well under the buffer's bound.
        self._flush_chars = min(self.FLUSH_BYTES, sink.capacity // 8)
        self._batches: dict[asyncio.AbstractEventLoop, list[str]] = {}
        self._chars: dict[asyncio.AbstractEventLoop, int] = {}
        sink.before_close(self.flush)

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            if self._batches:  # lines of a loop that ended before handing them over go first
                self._hand_over_closed()
            self._sink.write(message + "\n")
            return
        batch = self._batches.get(loop)
        if batch is None:
            if self._batches:
                self._hand_over_closed()
            self._batches[loop] = [message]
            self._chars[loop] = len(message)
            loop.call_later(self.FLUSH_SECONDS, self._hand_over, loop)
            return
        batch.append(message)
        chars = self._chars[loop] = self._chars[loop] + len(message)
        if len(batch) >= self.FLUSH_LINES or chars >= self._flush_chars:
            self._hand_over(loop)

    info = debug = warning = error = critical = exception = log = msg

    def flush(self) -> None:
        """Hand over now what this thread's loop and every stopped loop have gathered.

        A loop running in another thread keeps its lines: they are its own
        thread's to hand over (its timer does, within ``FLUSH_SECONDS``).
        """
        try:
            current: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        for loop in list(self._batches):
            if loop is current or not loop.is_running():
                self._hand_over(loop)

    def _hand_over_closed(self) -> None:
        for loop in list(self._batches):
            if loop.is_closed():
                self._hand_over(loop)

    def _hand_over(self, loop: asyncio.AbstractEventLoop) -> None:
        self._chars.pop(loop, None)
        batch = self._batches.pop(loop, None)
        if batch:
            self._sink.write("\n".join(batch) + "\n", len(batch))


class SinkHandler(logging.Handler):
    """A stdlib logging handler that formats records into a ``LogSink``."""

    def __init__(self, sink: LogSink) -> None:
        super().__init__()
        self._sink = sink

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._sink.write(self.format(record) + "\n")
        except Exception:  # logging's contract: a handler never raises
            self.handleError(record)


def _report_dropped(count: int) -> None:
    structlog.get_logger("broker.logs").warning("log_lines_dropped", dropped=count)


def install_sink(stream: TextIO, max_buffer_bytes: int) -> LogSink:
    """A new process-wide sink (the previous one, if any, is closed)."""
    previous = _COUNTS.sink
    if previous is not None:
        previous.close()
    sink = LogSink(stream, max_buffer_bytes=max_buffer_bytes, on_recovered=_report_dropped)
    _COUNTS.sink = sink
    return sink


@atexit.register
def _close_sink_at_exit() -> None:
    sink = _COUNTS.sink
    if sink is not None:
        with contextlib.suppress(Exception):
            sink.close(timeout=2.0)
