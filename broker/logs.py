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

The daemon writes through ``broker.log_writer.LogSink``: a bounded buffer
drained by one writer thread, so a slow or blocked stderr (a pipe nobody
reads) never stops the event loop; past the bound lines are dropped and counted.
The few lines every request writes skip structlog's generic chain:
``broker.hot_log`` renders them with the same pieces (``hot_route``,
``STAMPER``, ``redact_secrets``, ``render_json``, ``scrub_text``).
"""

from __future__ import annotations

import functools
import logging
import re
import sys
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson
import structlog

from broker.log_writer import (
    DEFAULT_BUFFER_BYTES,
    LogSink,
    LoopBatchedLogger,
    SinkHandler,
    install_sink,
)
from broker.request_context import merge_request_context

__all__ = [
    "REDACTED",
    "STAMPER",
    "HotRoute",
    "IsoTimeStamper",
    "configure_logging",
    "hot_route",
    "is_secret_name",
    "may_hold_named_secret",
    "redact_secrets",
    "render_json",
    "scrub_named",
    "scrub_rendered",
    "scrub_text",
]

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


def may_hold_named_secret(lowered: str) -> bool:
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
def is_secret_name(key: str) -> bool:
    """Whether a field called ``key`` holds a secret (its value is always redacted)."""
    return key.lower().replace("-", "_") in _SECRET_KEYS


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and is_secret_name(key)


def _keep_scheme(match: re.Match[str]) -> str:
    return (match.group(1) or match.group(2)) + REDACTED


def _mask_key_secret(match: re.Match[str]) -> str:
    run = match.group(0)
    if run.lower() == run or run.upper() == run or _CAMEL_CASE.fullmatch(run):
        return run
    return REDACTED


def _mask_run(run: str) -> str:
    if "sk_" in run or "eyJ" in run or "CAIS" in run or "CAES" in run:  # what _SHAPES needs
        run = _SHAPES.sub(REDACTED, run)
    return _KEY_SECRET.sub(_mask_key_secret, run)


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
    return _mask_shapes(scrub_named(text))


def scrub_named(text: str) -> str:
    """``text`` with named secrets masked (``access_token=``, signatures, ``Bearer``...), no shapes.

    The audit trail's scrub (``broker.audit``): its records hold opaque
    identifiers on purpose (JWT subjects, object keys, request ids) that the
    shape masking would take for secrets.
    """
    if may_hold_named_secret(text.lower()):
        text = _SCHEME.sub(_keep_scheme, _NAMED.sub(r"\1" + REDACTED, text))
    return text


# Values that hold no others, by exact type: most values of a line, skipped without
# an isinstance check (``Mapping`` is an ABC: checking it costs a lookup per value).
_SCALARS = frozenset({str, int, float, bool, type(None)})
_SEQUENCES = (list, tuple, set, frozenset)
_CONTAINERS = (Mapping, *_SEQUENCES)


def _mask(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        return REDACTED
    if type(value) in _SCALARS:
        return value
    if isinstance(value, Mapping):
        return {k: REDACTED if _is_secret_key(k) else _mask(v, depth + 1) for k, v in value.items()}
    if isinstance(value, _SEQUENCES):
        return [_mask(item, depth + 1) for item in value]
    return value


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask values of secret keys, at any depth."""
    for key, value in event_dict.items():
        if _is_secret_key(key):
            event_dict[key] = REDACTED
        elif type(value) not in _SCALARS and isinstance(value, _CONTAINERS):
            event_dict[key] = _mask(value)
    return event_dict


def scrub_rendered(logger: Any, method_name: str, line: Any) -> Any:
    """structlog processor after the renderer: scrub secret shapes from the whole line.

    One scan per line instead of one per value; it also covers what no key
    names, such as an exception's text.
    """
    return scrub_text(line) if isinstance(line, str) else line


def render_json(event_dict: Mapping[str, Any]) -> str:
    """The JSON line of an event (before the scrub): orjson, ``repr`` for what it cannot encode."""
    return orjson.dumps(event_dict, default=repr).decode()


def _orjson_dumps(value: Any, **_: Any) -> str:
    return render_json(value)


class IsoTimeStamper:
    """structlog processor: ``timestamp`` as ``TimeStamper(fmt="iso", utc=True)`` writes it.

    ``2026-12-02T06:20:01.405469Z`` (no fraction when the microseconds are 0,
    as ``datetime.isoformat``); the date and time are formatted once per second
    and only the microseconds appended per line.
    """

    __slots__ = ("_cached", "_clock")

    def __init__(self, clock: Callable[[], int] = time.time_ns) -> None:
        self._clock = clock  # nanoseconds since the epoch
        self._cached = (-1, "")  # one tuple, swapped whole: safe across threads

    def now(self) -> str:
        """The current time, formatted."""
        second, nanos = divmod(self._clock(), 1_000_000_000)
        cached_second, text = self._cached
        if second != cached_second:
            text = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
            self._cached = (second, text)
        micros = nanos // 1000
        return f"{text}.{micros:06d}Z" if micros else f"{text}Z"

    def __call__(
        self, logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        event_dict["timestamp"] = self.now()
        return event_dict


STAMPER = IsoTimeStamper()
"""The process's time stamper: the chain's and ``broker.hot_log``'s."""

_SHARED: list[Any] = [
    structlog.contextvars.merge_contextvars,
    merge_request_context,  # request_id, caller, policy (broker.request_context)
    structlog.processors.add_log_level,
    STAMPER,
]
_TAIL: list[Any] = [structlog.processors.format_exc_info, redact_secrets]


@dataclass(frozen=True, slots=True)
class HotRoute:
    """How ``broker.hot_log`` writes a line itself, as the chain ``configure_logging`` set up would.

    ``processors`` is the list given to structlog: while structlog still runs
    it, unchanged (``structlog.testing.capture_logs`` edits it in place,
    ``reset_defaults`` or another ``configure`` replace it), the route holds.
    """

    processors: list[Any]
    info_enabled: bool
    write: Callable[[str], None]  # the chain's own writer: the sink's batcher, or the stream


_ROUTE: list[HotRoute | None] = [None]


def hot_route() -> HotRoute | None:
    """The direct route for JSON lines, or ``None``: console output, or structlog reconfigured."""
    route = _ROUTE[0]
    if route is None:
        return None
    processors = route.processors
    if _configured_processors() is not processors or processors[-1] is not scrub_rendered:
        return None
    return route


def _configured_processors() -> Any:
    """``structlog.get_config()["processors"]``, without building the whole dict per line."""
    config = getattr(structlog._config, "_CONFIG", None)  # structlog/_config.py
    found = getattr(config, "default_processors", None)
    return found if found is not None else structlog.get_config()["processors"]


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
    sink = install_sink(stream, max_buffer_bytes) if background else None
    renderer = _renderer(fmt, stream)
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    writer = structlog.PrintLogger(file=stream) if sink is None else LoopBatchedLogger(sink)
    processors = [*_SHARED, *_TAIL, renderer, scrub_rendered]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=lambda *_: writer,
        cache_logger_on_first_use=cache_loggers,
    )
    json_lines = isinstance(renderer, structlog.processors.JSONRenderer)
    route = HotRoute(processors, numeric_level <= logging.INFO, writer.msg)
    _ROUTE[0] = route if json_lines else None
    handler = logging.StreamHandler(stream) if sink is None else SinkHandler(sink)
    handler.setFormatter(_stdlib_formatter(renderer))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.INFO))
    return sink


def _stdlib_formatter(renderer: Any) -> logging.Formatter:
    """Standard-library records (aiohttp, asyncio) through the same chain as ours."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_SHARED, structlog.stdlib.add_logger_name],
        processors=[
            *_TAIL,
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            renderer,
            scrub_rendered,
        ],
    )


def _renderer(fmt: str, stream: TextIO) -> Any:
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    if use_json:
        return structlog.processors.JSONRenderer(serializer=_orjson_dumps)
    return structlog.dev.ConsoleRenderer(colors=stream.isatty())
