"""The few lines every request writes, rendered directly instead of through structlog's chain.

``request_finished`` (one per request) and ``credentials_issued`` /
``url_presigned`` / ``post_policy_signed`` (one per issuance) went through
structlog's generic chain, a third of a cached request's time.  ``emit``
builds the same JSON object the chain would and applies the same guards::

    fields + event + bound context (request_id, caller...) + level + timestamp
      → no key names a secret, every value a string or a number:
            scrub_text on each string value (memoised) → orjson
      → otherwise, as the chain: redact_secrets (secret keys, any depth)
            → orjson → scrub_text on the whole line
      → the chain's own writer (the sink's loop batcher, or the stream)

The memo of scrubbed values holds values the lines carried (never written
anywhere unscrubbed), at most 8,192 of them, each at most 256 characters.

The level is the one ``configure_logging`` set; everything else (console
output on a TTY, structlog not configured by ``configure_logging``, or
reconfigured since, such as ``structlog.testing.capture_logs``) goes through
structlog as before.  Every other event keeps using structlog.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from typing import Any

import structlog

from broker.logs import (
    STAMPER,
    hot_route,
    is_secret_name,
    redact_secrets,
    render_json,
    scrub_named,
    scrub_text,
)

__all__ = ["emit"]

_fallback = structlog.get_logger("broker.hot_log")


def _structlog_context() -> Callable[[], dict[str, Any]]:
    """What structlog's ``merge_contextvars`` would add: the bound context of this task.

    structlog keeps one ``ContextVar`` per bound key in ``_CONTEXT_VARS``
    (.venv/lib/python3.11/site-packages/structlog/contextvars.py): reading
    those few is much cheaper than ``merge_contextvars``' walk over every
    variable of the context.  Without it, the public ``get_contextvars``.
    """
    variables: dict[str, contextvars.ContextVar[Any]] | None = getattr(
        structlog.contextvars, "_CONTEXT_VARS", None
    )
    if variables is None:
        return structlog.contextvars.get_contextvars

    skip = len(structlog.contextvars.STRUCTLOG_KEY_PREFIX)  # "structlog_request_id"

    def bound() -> dict[str, Any]:
        # list(): one step under the GIL, should another thread bind a new key meanwhile
        values = {name: var.get(Ellipsis) for name, var in list(variables.items())}
        return {name[skip:]: value for name, value in values.items() if value is not Ellipsis}

    return bound


_bound_context = _structlog_context()


def emit(event: str, fields: dict[str, Any]) -> None:
    """Write the ``info`` line ``event`` with ``fields`` (the dict is taken over, not copied)."""
    route = hot_route()
    if route is None or "exc_info" in fields:
        _fallback.info(event, **fields)
        return
    if not route.info_enabled:
        return
    fields["event"] = event
    for name, value in _bound_context().items():  # merge_contextvars: fields win
        fields.setdefault(name, value)
    fields["level"] = "info"
    if _plain_keys(tuple(fields)) and _scrub_values(fields):
        fields["timestamp"] = STAMPER.now()  # ours, and never a secret's shape
        route.write(render_json(fields))  # every value scrubbed on its own: same guarantees
        return
    fields["timestamp"] = STAMPER.now()
    redact_secrets(None, "info", fields)
    route.write(scrub_text(render_json(fields)))


@functools.lru_cache(maxsize=256)
def _plain_keys(keys: tuple[str, ...]) -> bool:
    """Whether no key names a secret, so only values need scrubbing (the hot lines' few key sets).

    A key that is a secret's name is redacted by ``redact_secrets``; one that
    ``scrub_text`` would read as a name before its value (``id_token``) could
    only be scrubbed on the whole line.  Either sends the line the slow way.
    """
    return not any(
        is_secret_name(key) or scrub_named(f"{key}=value") != f"{key}=value" for key in keys
    )


def _scrub_values(fields: dict[str, Any]) -> bool:
    """Scrub each string value in place, as the whole line's scan would; ``False`` for a container.

    A secret shape is a run of token characters, which the JSON punctuation
    around a value ends, so each value scanned alone is scanned as in the line.
    The values seen again and again (paths, ids, prefixes) are scanned once.
    """
    for key, value in fields.items():
        kind = type(value)
        if kind is str:
            fields[key] = _scrubbed(value) if len(value) <= _MEMO_CHARS else scrub_text(value)
        elif kind not in _SCALARS:
            return False
    return True


_SCALARS = frozenset({int, float, bool, type(None)})
_MEMO_CHARS = 256


@functools.lru_cache(maxsize=8192)
def _scrubbed(value: str) -> str:
    return scrub_text(value)
