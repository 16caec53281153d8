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

import orjson
import structlog

from broker import request_context
from broker.logs import (
    STAMPER,
    HotRoute,
    hot_route,
    is_secret_name,
    redact_secrets,
    render_json,
    scrub_named,
    scrub_text,
)

__all__ = ["emit", "finish", "line_route", "line_start", "varying_json"]

_fallback = structlog.get_logger("broker.hot_log")


def _structlog_context() -> Callable[[], dict[str, Any]]:
    """What structlog's ``merge_contextvars`` would add: the context bound with structlog.

    Requests bind nothing there (their id, caller and policy are in
    ``broker.request_context``); a worker binds its index once.  structlog
    keeps one ``ContextVar`` per bound key in ``_CONTEXT_VARS``
    (.venv/lib/python3.11/site-packages/structlog/contextvars.py): reading
    those few is much cheaper than ``merge_contextvars``' walk over every
    variable of the context.  Without it, the public ``get_contextvars``.
    """
    variables: dict[str, contextvars.ContextVar[Any]] | None = getattr(
        structlog.contextvars, "_CONTEXT_VARS", None
    )
    if variables is None:
        return structlog.contextvars.get_contextvars

    skip = len(structlog.contextvars.STRUCTLOG_KEY_PREFIX)  # "structlog_worker"

    def bound() -> dict[str, Any]:
        if not variables:
            return _NOTHING
        # list(): one step under the GIL, should another thread bind a new key meanwhile
        values = {name: var.get(Ellipsis) for name, var in list(variables.items())}
        return {name[skip:]: value for name, value in values.items() if value is not Ellipsis}

    return bound


_NOTHING: dict[str, Any] = {}
_bound_context = _structlog_context()


def emit(event: str, fields: dict[str, Any], varying: dict[str, Any] | None = None) -> None:
    """Write the ``info`` line ``event`` with ``fields`` (the dict is taken over, not copied).

    ``varying``: fields that change from line to line (numbers, booleans,
    ``None``), written after the others; ``fields`` are then those that repeat
    (each name keeping one type of value), whose rendering is kept (``_prefix``)
    with the request's caller and policy; the request id and the time follow.
    ``varying`` names none of ``fields`` nor ``event``, ``level``, ``request_id``,
    ``timestamp``.  An empty ``varying`` is as ``None``.
    """
    route = hot_route()
    if route is None or "exc_info" in fields:
        _fallback.info(event, **fields, **(varying or {}))
        return
    if not route.info_enabled:
        return
    context = request_context.current()
    bound = _bound_context()
    if varying and _plain(varying):
        start = _start(event, fields, bound, context)
        if start:
            finish(route, start, varying_json(varying), bound, context)
            return
    if varying is not None:
        fields.update(varying)
    _emit_fields(route, event, fields, bound, context)


def line_route() -> tuple[HotRoute, dict[str, Any]] | None:
    """The route ``emit`` writes info lines by, and structlog's bound context; ``None`` if
    lines are not written here now (structlog's chain renders them, or info is off)."""
    route = hot_route()
    if route is None or not route.info_enabled:
        return None
    return route, _bound_context()


def line_start(event: str, fields: dict[str, Any], bound: dict[str, Any]) -> str:
    """How ``emit`` begins the line ``event`` with the repeating ``fields`` in this request's
    context (``bound`` from ``line_route``): ``{...,"level":"info",`` rendered and scrubbed,
    or ``""`` when such a line is rendered another way (``emit`` then knows which)."""
    return _start(event, fields, bound, request_context.current())


def finish(
    route: HotRoute,
    start: str,
    varying: str,
    bound: dict[str, Any],
    context: request_context.RequestContext,
) -> None:
    """Write the line ``start`` began: ``varying`` (``varying_json``), request id and time."""
    request_id = None if "request_id" in bound else context.log_request_id  # bound wins
    ident = f',"request_id":"{request_id}"' if request_id is not None else ""
    route.write(f'{start}{varying}{ident},"timestamp":"{STAMPER.now()}"}}')


def varying_json(varying: dict[str, Any]) -> str:
    """``varying``'s fields as they follow a line's start: ``"duration_ms":1.5``."""
    return orjson.dumps(varying).decode()[1:-1]


def _start(
    event: str,
    fields: dict[str, Any],
    bound: dict[str, Any],
    context: request_context.RequestContext,
) -> str:
    """The kept start of a line (``_prefix``), or ``""``."""
    if "request_id" in fields or "exc_info" in fields:
        return ""
    principal = context.principal
    key = (
        event,
        tuple(fields.items()),
        principal.subject if principal is not None else None,
        context.policy,
        tuple(bound.items()) if bound else None,
    )
    try:
        prefix = _PREFIXES.get(key)
    except TypeError:  # a value that is a list or a dict: no template
        return ""
    if prefix is None:
        prefix = _prefix(key, event, fields, bound, context)
    return prefix


def _emit_fields(
    route: HotRoute,
    event: str,
    fields: dict[str, Any],
    bound: dict[str, Any],
    context: request_context.RequestContext,
) -> None:
    """One line of ``fields`` with event, context, level and time, as structlog's chain has it."""
    if _completed(event, fields, bound, context):
        if context.request_id is not None:  # scrubbed once, when the request began
            fields.setdefault("request_id", context.log_request_id)
        fields["timestamp"] = STAMPER.now()  # ours, and never a secret's shape
        route.write(render_json(fields))  # every value scrubbed on its own: same guarantees
        return
    if context.request_id is not None:
        fields.setdefault("request_id", context.request_id)
    fields["timestamp"] = STAMPER.now()
    redact_secrets(None, "info", fields)
    route.write(scrub_text(render_json(fields)))


def _completed(
    event: str,
    fields: dict[str, Any],
    bound: dict[str, Any],
    context: request_context.RequestContext,
) -> bool:
    """``fields`` with event, context and level; scrubbed value by value if that may do (True)."""
    fields["event"] = event
    _merge_context(fields, bound, context)
    fields["level"] = "info"
    return _plain_keys(tuple(fields)) and _scrub_values(fields)


def _merge_context(
    fields: dict[str, Any], bound: dict[str, Any], context: request_context.RequestContext
) -> None:
    """structlog's bound context, then the request's caller and policy: a line's fields win."""
    for name, value in bound.items():
        fields.setdefault(name, value)
    if context.principal is not None:
        fields.setdefault("caller", context.principal.subject)
    if context.policy is not None:
        fields.setdefault("policy", context.policy)


def _prefix(
    key: _PrefixKey,
    event: str,
    fields: dict[str, Any],
    bound: dict[str, Any],
    context: request_context.RequestContext,
) -> str:
    """The repeating part of a line, rendered and scrubbed: ``{...,"level":"info",`` (or ``""``).

    ``""`` when it has a key that must be redacted or a value that is no
    scalar: such a line takes the general way every time.
    """
    line = dict(fields)
    prefix = render_json(line)[:-1] + "," if _completed(event, line, bound, context) else ""
    if len(_PREFIXES) >= _MAX_PREFIXES:
        _PREFIXES.clear()
    _PREFIXES[key] = prefix
    return prefix


_PrefixKey = tuple[str, tuple[tuple[str, Any], ...], str | None, str | None, object]
_PREFIXES: dict[_PrefixKey, str] = {}
"""Rendered, scrubbed beginnings of lines, by their fields and context.  Keyed by the
values as given (as ``_scrubbed`` is): a secret a client put in a path is held here,
bounded, never written (the rendered prefix is scrubbed)."""
_MAX_PREFIXES = 4096


def _plain(varying: dict[str, Any]) -> bool:
    """Whether every varying value is a number, a boolean or ``None`` (nothing to scrub)."""
    return _SCALARS.issuperset(map(type, varying.values()))


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
