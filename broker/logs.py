"""structlog configuration and secret redaction.

Configured once, at start-up, by the CLI: JSON lines in production, a
console renderer on a TTY.  Every event passes ``redact_secrets`` before it is
rendered, which masks known secret keys at any depth and scrubs secret-bearing
fragments (``access_token=``, URL signatures, security tokens, bearer tokens)
out of string values.  Standard-library loggers (aiohttp's) go through the
same chain.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, TextIO

import structlog

__all__ = ["REDACTED", "configure_logging", "redact_secrets"]

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
_MAX_DEPTH = 8


def _is_secret_key(key: object) -> bool:
    return isinstance(key, str) and key.lower().replace("-", "_") in _SECRET_KEYS


def _scrub(value: Any, depth: int = 0) -> Any:
    if depth > _MAX_DEPTH:
        return REDACTED
    if isinstance(value, str):
        return _BEARER.sub(r"\1" + REDACTED, _SECRET_FRAGMENTS.sub(r"\1" + REDACTED, value))
    if isinstance(value, Mapping):
        return {
            k: REDACTED if _is_secret_key(k) else _scrub(v, depth + 1) for k, v in value.items()
        }
    if isinstance(value, list | tuple | set | frozenset):
        return [_scrub(item, depth + 1) for item in value]
    return value


def redact_secrets(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: mask secret keys at any depth, scrub secret fragments in strings."""
    for key in list(event_dict):
        value = event_dict[key]
        event_dict[key] = REDACTED if _is_secret_key(key) else _scrub(value)
    return event_dict


def configure_logging(fmt: str = "auto", level: str = "info", stream: TextIO | None = None) -> None:
    """Configure structlog (and route stdlib logging through it) for the whole process."""
    stream = stream if stream is not None else sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer()
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
    structlog.configure(
        processors=[*shared, *tail, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=stream),
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[*tail, structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric_level, logging.INFO))
