"""Prefix templates (``avatars/${subject}/``): parsed once, filled only with safe values.

A template variable may never widen the scope.  So a variable must end its
path segment, a segment holds at most one, and a value must pass
``check_template_value`` (the caller-id rule of ``broker.names``): one path
segment, no wildcard, no ``..``.  Two distinct values then always give two
prefixes of which neither is the start of the other (``a/`` and ``ab/``).
"""

from __future__ import annotations

import re
from functools import lru_cache

from broker.names import CALLER_ID_CHARS, is_caller_id

__all__ = [
    "CLAIM_NAME_PATTERN",
    "MAX_VALUE_CHARS",
    "VALUE_RULE",
    "Segment",
    "check_template_value",
    "claim_names",
    "fill_template",
    "parse_template",
]

MAX_VALUE_CHARS = 64
"""The longest value a variable may stand for (the caller-id rule's length)."""

VALUE_RULE = (
    f"one path segment of 1-{MAX_VALUE_CHARS} characters of {CALLER_ID_CHARS}, "
    "starting with a letter or digit, without '..' (so never *, ? or /)"
)
"""What ``check_template_value`` accepts, in words for ops."""

CLAIM_NAME_PATTERN = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}"
"""The NAME of a ``${claim:NAME}`` variable: the JWT claims a template may use."""

_VARIABLE = re.compile(r"\$\{([^}]*)\}")
_VARIABLE_NAME = re.compile(rf"subject|group|claim:{CLAIM_NAME_PATTERN}")
_CLAIM_VARIABLE = re.compile(r"\$\{claim:([^}]*)\}")
_STATIC_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._@=+-")

Segment = tuple[str, str | None]
"""One path segment of a template: its static text, then at most one variable at its end."""


@lru_cache(maxsize=1024)
def parse_template(template: str) -> tuple[Segment, ...]:
    """Split a prefix template into segments, or raise ``ValueError`` saying why it is unsafe."""
    if not template:
        raise ValueError('must not be empty; use a path such as "uploads/${subject}/"')
    if "*" in template or "?" in template:
        raise ValueError("must not contain * or ?: RAM treats them as wildcards, with no escape")
    if template.startswith("/"):
        raise ValueError("must not start with / (OSS keys have no leading slash)")
    if not template.endswith("/"):
        raise ValueError("must end with / so that user1/ can never match the start of user10/")
    return tuple(_parse_segment(segment) for segment in template[:-1].split("/"))


def _parse_segment(segment: str) -> Segment:
    if not segment:
        raise ValueError("must not contain an empty path segment (//)")
    if segment in {".", ".."}:
        raise ValueError("must not contain a . or .. path segment")
    found = list(_VARIABLE.finditer(segment))
    for match in found:
        if _VARIABLE_NAME.fullmatch(match.group(1)) is None:
            raise ValueError(
                f"variable {match.group(0)} is not defined; "
                "use ${subject}, ${group} or ${claim:NAME}"
            )
    if len(found) > 1:
        raise ValueError(f"path segment {segment!r} holds more than one variable; allowed: one")
    static, variable = segment, None
    if found:
        if found[0].end() != len(segment):
            raise ValueError(
                f"variable {found[0].group(0)} must end its path segment (be followed by /)"
            )
        static, variable = segment[: found[0].start()], found[0].group(1)
    _check_static(static)
    return static, variable


def _check_static(static: str) -> None:
    if set("${}") & set(static):
        raise ValueError("has a malformed variable; write ${subject}, ${group} or ${claim:NAME}")
    for char in static:
        if char not in _STATIC_CHARS:
            raise ValueError(
                f"character {char!r} is not allowed; "
                "static text may use A-Z a-z 0-9 . _ @ = + - and /, and ${...} variables"
            )
    if ".." in static:
        raise ValueError("must not contain ..")


def fill_template(segments: tuple[Segment, ...], value: str) -> str:
    """The template with every variable replaced by ``value`` (unchecked: for sizing only)."""
    return "".join(f"{static}{value if variable else ''}/" for static, variable in segments)


def claim_names(template: str) -> frozenset[str]:
    """The JWT claims a template uses as ``${claim:NAME}``."""
    return frozenset(_CLAIM_VARIABLE.findall(template))


def check_template_value(value: str) -> str:
    """``value`` if it is safe as one path segment, else ``ValueError`` (never naming it).

    A template variable may never widen the scope: RAM has no escape for
    ``*`` and ``?``, and ``/`` or ``..`` would leave the caller's segment.
    """
    if not isinstance(value, str):
        raise ValueError("template value must be a string")
    if not value:
        raise ValueError("template value must not be empty")
    if len(value) > MAX_VALUE_CHARS:
        raise ValueError(f"template value must be at most {MAX_VALUE_CHARS} characters")
    if ".." in value:
        raise ValueError("template value must not contain two dots in a row")
    if not is_caller_id(value):
        raise ValueError(
            f"template value must start with a letter or digit and contain only {CALLER_ID_CHARS}"
        )
    return value
