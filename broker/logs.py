"""structlog configuration and secret redaction.

Configured once, at start-up, by the CLI: JSON lines in production, a
console renderer on a TTY.  Every event passes ``redact_secrets`` before it is
rendered, which masks known secret keys at any depth and scrubs secret-bearing
fragments (``access_token=``, URL signatures, security tokens, bearer tokens)
out of string values.  Standard-library loggers (aiohttp's) go through the
same chain.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import orjson
import structlog

__all__ = ["REDACTED", "configure_logging", "redact_secrets", "scrub_rendered"]

REDACTED = "[redacted]"

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
_SECRET_FRAGMENTS = re.compile(
    r"(?i)((?:access_token|x-oss-signature|x-oss-security-token|signature|security-?token"
    r"|accesskeysecret|access_key_secret)[\"']?\s*[=:]\s*[\"']?)[^&\s\"',;}]+"
)
_BEARER = re.compile(r"(?i)(bearer\s+)[^\s\"',;}]+")
# Every pattern above needs one of these (case-insensitively): a cheap test first.
_TRIGGERS = ("token", "signature", "secret", "bearer")
_MAX_DEPTH = 8


@functools.lru_cache(maxsize=4096)
def _is_secret_name(key: str) -> bool:
    return key.lower().replace("-", "_") in _SECRET_KEYS


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and _is_secret_name(key)


def _scrub_text(text: str) -> str:
    lowered = text.lower()
    if not any(trigger in lowered for trigger in _TRIGGERS):
        return text
    return _BEARER.sub(r"\1" + REDACTED, _SECRET_FRAGMENTS.sub(r"\1" + REDACTED, text))


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
    """structlog processor after the renderer: scrub secret fragments from the whole line.

    ``access_token=``, URL signatures, security tokens and bearer tokens are
    masked wherever they appear (messages, paths, exception text), one scan
    per line instead of one per value.
    """
    return _scrub_text(line) if isinstance(line, str) else line


def _orjson_dumps(value: Any, **_: Any) -> str:
    return orjson.dumps(value, default=repr).decode()


class _BatchedWriter:
    """Writes lines to ``stream`` once per event-loop iteration instead of once per line.

    Under load many requests finish in one iteration of the loop; one write
    (and flush) for all their log lines saves a system call per line.  Outside
    a running loop, and at exit, lines are written at once.
    """

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._pending: list[str] = []
        self._scheduled = False
        atexit.register(self.flush)

    def msg(self, message: str) -> None:
        self._pending.append(message)
        if self._scheduled:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._scheduled = True
        loop.call_soon(self.flush)

    info = debug = warning = error = critical = exception = log = msg

    def flush(self) -> None:
        self._scheduled = False
        if not self._pending:
            return
        lines, self._pending = self._pending, []
        self._stream.write("\n".join(lines) + "\n")
        self._stream.flush()


def configure_logging(
    fmt: str = "auto",
    level: str = "info",
    stream: TextIO | None = None,
    *,
    batched: bool = False,
) -> None:
    """Configure structlog (and route stdlib logging through it) for the whole process.

    ``batched`` (for the daemon) writes once per event-loop iteration and lets
    module loggers cache their configuration; tests that reconfigure logging
    leave it off.
    """
    stream = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_orjson_dumps)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tail: list[Any] = [structlog.processors.format_exc_info, redact_secrets]
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    if batched:
        writer = _BatchedWriter(stream)
        factory: Any = lambda *_: writer  # noqa: E731 - structlog wants a callable
    else:
        factory = structlog.PrintLoggerFactory(file=stream)
    structlog.configure(
        processors=[*shared, *tail, renderer, scrub_rendered],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=factory,
        cache_logger_on_first_use=batched,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            *tail,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
            scrub_rendered,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.INFO))
