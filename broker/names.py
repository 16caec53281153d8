"""The shape of every name and id the broker accepts, and the STS time format: one source each.

Each rule is kept as a pattern *body* (no anchors), so pydantic fields,
``re.fullmatch`` and the OpenAPI document all use the very same text.
"""

from __future__ import annotations

import functools
import math
import re
from datetime import UTC, datetime

__all__ = [
    "CALLER_ID",
    "CALLER_ID_CHARS",
    "CALLER_ID_PATTERN",
    "POLICY_NAME",
    "POLICY_NAME_PATTERN",
    "POLICY_NAME_RULE",
    "REQUEST_ID",
    "REQUEST_ID_PATTERN",
    "STS_TIME_FORMAT",
    "format_sts_time",
    "is_caller_id",
]

POLICY_NAME_PATTERN = r"[a-z0-9][a-z0-9-]{0,62}"
"""A policy's ``name``: what callers put in ``/v1/credentials/{policy}``."""
POLICY_NAME = re.compile(POLICY_NAME_PATTERN)
POLICY_NAME_RULE = "a policy name is 1-63 characters of a-z, 0-9 and '-', not starting with '-'"

CALLER_ID_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}"
"""An API-key or mTLS caller id, a group name: it becomes ``${subject}``/``${group}``."""
CALLER_ID = re.compile(CALLER_ID_PATTERN)
CALLER_ID_CHARS = "A-Z a-z 0-9 . _ @ -"


def is_caller_id(value: str) -> bool:
    """True when ``value`` is a usable caller id: the pattern, and never ``..``.

    ``..`` is refused because an id is rendered into a key prefix as a path segment.
    """
    return CALLER_ID.fullmatch(value) is not None and ".." not in value


REQUEST_ID_PATTERN = r"[A-Za-z0-9._-]{8,64}"
"""An ``X-Request-Id`` the broker adopts from the caller (anything else gets a fresh one)."""
REQUEST_ID = re.compile(REQUEST_ID_PATTERN)

STS_TIME_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
"""STS's ``Expiration`` format (``2026-11-21T05:00:00Z``), used on the wire both ways."""


def format_sts_time(moment: datetime) -> str:
    """``moment`` (aware) in the STS wire format, in UTC, to the second."""
    return _format_second(math.floor(moment.timestamp()))


@functools.lru_cache(maxsize=1024)
def _format_second(second: int) -> str:
    """One second's STS time text, formatted once (the hot paths format the same few)."""
    return datetime.fromtimestamp(second, UTC).strftime(STS_TIME_FORMAT)
