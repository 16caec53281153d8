"""Whether an STS token's inline RAM policy lets it act on an OSS object, as RAM decides.

``Deny`` wins over ``Allow``; nothing allowed is denied; ``*`` and ``?`` are
RAM's wildcards; actions compare case-insensitively, resources exactly, on
``acs:oss:<region>:<account>:<bucket>/<key>``.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from typing import Any

from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.sts import IssuedCredentials

__all__ = ["authorize"]

_ROLE_ACCOUNT = re.compile(r"acs:ram::(?P<account>\d+):role/")


def authorize(
    issued: IssuedCredentials, action: str, bucket: str, key: str | None, region: str
) -> None:
    """Raise AccessDenied unless the token's inline policy allows ``action`` on the object.

    Without an inline policy the token has its role's permissions, which the
    emulator does not model: it allows.  A statement with a ``Condition`` is
    not evaluated: as an Allow it never applies, as a Deny it always does.
    """
    if not issued.policy:
        return
    match = _ROLE_ACCOUNT.match(issued.role_arn)
    account = match["account"] if match else "0"
    resource = f"acs:oss:{region}:{account}:{bucket}" + ("" if key is None else f"/{key}")
    statements = json.loads(issued.policy).get("Statement", [])
    effects = {s.get("Effect") for s in statements if _applies(s, action, resource)}
    if "Deny" in effects or "Allow" not in effects:
        kind = "ExplicitDeny" if "Deny" in effects else "ImplicitDeny"
        detail = {"AuthAction": action, "NoPermissionType": kind}
        raise OssError(
            "AccessDenied",
            "Access denied by authorizer's policy.",
            ec="0003-00000301",
            details={"AccessDeniedDetail": detail},
        )


def _applies(statement: Mapping[str, Any], action: str, resource: str) -> bool:
    if "Condition" in statement:
        return bool(statement.get("Effect") == "Deny")
    return _matches(statement, "Action", action, ignore_case=True) and _matches(
        statement, "Resource", resource, ignore_case=False
    )


def _matches(statement: Mapping[str, Any], element: str, value: str, *, ignore_case: bool) -> bool:
    """``Action``/``Resource`` match, or ``NotAction``/``NotResource`` does not."""
    negated = f"Not{element}" in statement
    patterns = statement.get(f"Not{element}" if negated else element, [])
    if isinstance(patterns, str):
        patterns = [patterns]
    found = any(_wildcard(str(p), ignore_case).fullmatch(value) for p in patterns)
    return found != negated


@functools.lru_cache(maxsize=256)
def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """RAM wildcards: ``*`` any run of characters, ``?`` one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))
