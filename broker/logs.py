"""structlog configuration, secret redaction, and a log writer that never blocks the event loop.

Configured once, at start-up, by the CLI: JSON lines in production, a
console renderer on a TTY.  Standard-library loggers (aiohttp's, asyncio's)
go through the same chain.  Two layers keep secrets out of the log:

* ``redact_secrets`` masks the values of known secret keys at any depth;
* ``scrub_rendered`` scans each rendered line and masks every secret *shape*
  wherever it appears (messages, paths, exception text): our ``sk_`` API keys,
  JWTs, STS security tokens and AccessKey secrets, ``Bearer``/``Basic``/``Token``
  credentials, credential headers, ``access_token=``, ``Signature=`` and
  ``x-oss-signature=`` values.

The daemon writes through a ``LogSink``: a bounded buffer drained by one
writer thread, so a slow or blocked stderr (a pipe nobody reads) never stops
the event loop.  Past the bound lines are dropped and counted
(``lines_dropped``, exported as ``broker_log_lines_dropped_total``).
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import functools
import logging
import os
import re
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

__all__ = [
    "DEFAULT_BUFFER_BYTES",
    "REDACTED",
    "LogSink",
    "buffered_bytes",
    "configure_logging",
    "lines_dropped",
    "redact_secrets",
    "scrub_rendered",
    "scrub_text",
]

REDACTED = "[redacted]"
DEFAULT_BUFFER_BYTES = 1024 * 1024

_SECRET_KEYS = frozenset(
    {
        "access_key_secret",
        "accesskeysecret",
        "security_token",
        "securitytoken",
        "x_oss_security_token",
        "authorization",
        "access_token",
        "api_key",
        "apikey",
        "x_api_key",
        "bearer",
        "token",
        "secret",
        "password",
        "signature",
        "x_oss_signature",
        "cookie",
        "policy_document",
    }
)
# A value that may follow ``name=`` / ``name: `` / ``'name': '`` (query strings,
# headers, dict reprs); ``\\`` ends it so an escaped control byte is not eaten.
_VALUE = r"[\"']?\s*[=:]\s*[\"']?"
_NAMED = re.compile(
    r"(?i)((?:access_token|id_token|refresh_token|client_secret|x-oss-signature"
    r"|x-oss-security-token|signature|security-?token|accesskeysecret|access_key_secret"
    r"|password|authorization|x-api-key|api-key|x-auth-token|cookie)" + _VALUE + r")"
    r"(?:(?:bearer|basic|token|digest)\s+)?[^&\s\"',;}\\]+"
)
# ``Authorization`` schemes, with or without the header name in front: any Bearer
# value; a Basic or Token one when it looks like a credential (not prose).
_SCHEME = re.compile(
    r"(?i)(\bbearer\s+)[^\s\"',;}\\]+|(\b(?:basic|token)\s+)[A-Za-z0-9._~+/=:-]{8,}"
)
# Secret shapes, wherever they are: after a non-word character or an escape (``\n``).
_START = r"(?:(?<![A-Za-z0-9_-])|(?<=\\[nrt]))"
_SHAPES = re.compile(
    _START + r"sk_[A-Za-z0-9_-]{16,}"  # our API keys (broker.auth.generate_api_key)
    r"|" + _START + r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{2,}(?:\.[A-Za-z0-9_-]*){0,3}"  # JWS/JWE
    # STS SecurityToken: base64 starting CAIS (real STS, the emulator) or CAES.
    r"|" + _START + r"CA[EI]S[A-Za-z0-9+/=]{16,}"
)
# An AccessKeySecret: a run of 30+ letters and digits in mixed case (STS's and the
# emulator's are 40 characters, long-term ones 30).  Lower-case hex (request ids,
# digests) is not mixed case; an AccessKeyId (``STS.`` + letters) follows a dot.
_KEY_SECRET = re.compile(r"(?<![A-Za-z0-9.])[A-Za-z0-9]{30,}(?![A-Za-z0-9])")
# Words in CamelCase (error codes such as EntityNotExistRoleArnForAssumedRole) are
# not secrets: a random 30-character secret has this form about once in 10^5.
_CAMEL_CASE = re.compile(r"[a-z]*(?:[A-Z][a-z]+)+")
# Every shape above is a run of at least this many token characters holding an
# upper-case letter.  ASCII bytes → U (upper case), t (other token characters) or
# space, so such runs are found at C speed and only they go through the patterns.
_SHAPE_MIN_CHARS = 16
_TOKEN_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789-_+/=.")
_CHAR_CLASSES = bytes(
    ord("U") if 65 <= i <= 90 else ord("t") if i in _TOKEN_CHARS else 32 for i in range(256)
)
_ESCAPE_LETTERS = frozenset("nrt")


def _has_named_secret(lowered: str) -> bool:
    """Whether ``lowered`` may hold a named secret (``_NAMED``, ``_SCHEME``): a cheap test first."""
    return (
        "token" in lowered
        or "signature" in lowered
        or "secret" in lowered
        or "auth" in lowered
        or "bearer" in lowered
        or "basic" in lowered
        or "password" in lowered
        or "api-key" in lowered
        or "cookie" in lowered
    )


_MAX_DEPTH = 8


@functools.lru_cache(maxsize=4096)
def _is_secret_name(key: str) -> bool:
    return key.lower().replace("-", "_") in _SECRET_KEYS


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and _is_secret_name(key)


def _keep_scheme(match: re.Match[str]) -> str:
    return (match.group(1) or match.group(2)) + REDACTED


def _mask_key_secret(match: re.Match[str]) -> str:
    run = match.group(0)
    if run.lower() == run or run.upper() == run or _CAMEL_CASE.fullmatch(run):
        return run
    return REDACTED


def _mask_run(run: str) -> str:
    return _KEY_SECRET.sub(_mask_key_secret, _SHAPES.sub(REDACTED, run))


def _mask_shapes(text: str) -> str:
    """``text`` with every secret shape masked; only long token runs are searched."""
    if not text.isascii():
        return _mask_run(text)
    classes = text.encode("ascii").translate(_CHAR_CLASSES)
    parts: list[str] = []
    done = 0
    upper = classes.find(b"U")
    while upper != -1:
        start = classes.rfind(b" ", 0, upper) + 1
        end = classes.find(b" ", upper)
        end = len(classes) if end == -1 else end
        if end - start >= _SHAPE_MIN_CHARS:
            if start and text[start - 1] == "\\" and text[start] in _ESCAPE_LETTERS:
                start += 1  # "\nsk_...": the n belongs to the escape
            masked = _mask_run(text[start:end])
            if len(masked) != end - start or masked != text[start:end]:
                parts += [text[done:start], masked]
                done = end
        upper = classes.find(b"U", end)
    return "".join([*parts, text[done:]]) if parts else text


def scrub_text(text: str) -> str:
    """``text`` with every known secret shape masked (see the module docstring)."""
    if _has_named_secret(text.lower()):
        text = _SCHEME.sub(_keep_scheme, _NAMED.sub(r"\1" + REDACTED, text))
    return _mask_shapes(text)


def _mask(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else _mask(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_mask(item, depth + 1) for item in value]
    return value


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask values of secret keys, at any depth."""
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        elif isinstance(value, Mapping | list | tuple | set | frozenset):
            event_dict[key] = _mask(value)
    return event_dict


def scrub_rendered(logger: Any, method_name: str, line: Any) -> Any:
    """structlog processor after the renderer: scrub secret shapes from the whole line.

    One scan per line instead of one per value; it also covers what no key
    names, such as an exception's text.
    """
    return scrub_text(line) if isinstance(line, str) else line


def _orjson_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=repr).decode()


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

    Audit records travel this sink like any line today.  ``write`` returns
    ``False`` for a dropped line: the seam where a ``required`` audit sink can
    refuse an issuance whose record could not be kept (the trust issue decides).
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
        with self._lock:
            return self._drained.wait_for(lambda: self._buffered == 0, timeout)

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


class _LoopBatchedLogger:
    """structlog's logger for a ``LogSink``: one sink write per event-loop iteration.

    Under load many requests finish in one iteration of the loop; handing
    their lines over together costs one wake-up of the writer instead of one
    per line.  Outside a running loop (other threads, start-up, exit) a line
    goes to the sink at once.
    """

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink
        self._local = threading.local()

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._sink.write(message + "\n")
            return
        batch: tuple[asyncio.AbstractEventLoop, list[str]] | None = getattr(
            self._local, "batch", None
        )
        if batch is not None and batch[0] is loop:
            batch[1].append(message)
            return
        if batch is not None:  # left by a loop that closed before handing it over
            self._write(batch[1])
        self._local.batch = (loop, [message])
        loop.call_soon(self._hand_over)

    info = debug = warning = error = critical = exception = log = msg

    def _hand_over(self) -> None:
        batch = self._local.batch
        self._local.batch = None
        if batch is not None:
            self._write(batch[1])

    def _write(self, lines: list[str]) -> None:
        self._sink.write("\n".join(lines) + "\n", len(lines))


class _SinkHandler(logging.Handler):
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


def _install_sink(stream: TextIO, max_buffer_bytes: int) -> LogSink:
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


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    background: bool = False,
    cache_loggers: bool = False,
    max_buffer_bytes: int = DEFAULT_BUFFER_BYTES,
) -> LogSink | None:
    """Configure structlog (and route stdlib logging through it) for the whole process.

    ``background`` (the daemon: ``serve`` and ``dev``) writes through a
    ``LogSink`` holding at most ``max_buffer_bytes``, and returns it; without
    it lines are written at once (tests reading a ``StringIO``).
    ``cache_loggers`` lets module loggers keep their first configuration: the
    daemon configures logging once; tests that reconfigure it leave this off.
    """
    stream = stream if stream is not None else sys.stderr
    renderer = _renderer(fmt, stream)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Any] = [structlog.processors.format_exc_info, redact_secrets]
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    sink = _install_sink(stream, max_buffer_bytes) if background else None
    handler: logging.Handler = logging.StreamHandler(stream) if sink is None else _SinkHandler(sink)
    factory: Any = structlog.PrintLoggerFactory(file=stream)
    if sink is not None:
        writer = _LoopBatchedLogger(sink)
        factory = lambda *_: writer  # noqa: E731 - structlog wants a callable
    structlog.configure(
        processors=[*shared, *tail, renderer, scrub_rendered],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=factory,
        cache_logger_on_first_use=cache_loggers,
    )
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
            processors=[
                *tail,
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                renderer,
                scrub_rendered,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.INFO))
    return sink


def _renderer(fmt: str, stream: TextIO) -> Any:
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    if use_json:
        return structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    return structlog.dev.ConsoleRenderer(colors=stream.isatty())
