"""RAM policy evaluation, as RAM decides: Deny wins, Allow grants, Conditions must hold.

Sources (Alibaba Cloud RAM docs):

- Policy elements, https://www.alibabacloud.com/help/en/ram/policy-elements:
  ``Effect`` Allow/Deny (Deny wins when both match), ``Action``/``NotAction``,
  ``Resource``/``NotResource``, ``Condition``.
- OSS "RAM Policy", https://www.alibabacloud.com/help/en/oss/user-guide/how-oss-works-with-ram:
  explicit deny first, then an explicit allow, else denied by default.
- Conditional operators, https://www.alibabacloud.com/help/en/ram/conditional-operator:
  String (``StringEquals``, ``StringNotEquals``, ``StringEqualsIgnoreCase``,
  ``StringNotEqualsIgnoreCase``, ``StringLike``, ``StringNotLike``; ``*`` any
  run of characters including none, ``?`` one character, case-sensitive),
  Number (``NumericEquals`` ... ``NumericGreaterThanEquals``), Date and time
  (``DateEquals`` ... ``DateGreaterThanEquals``), ``Bool``, IP address
  (``IpAddress``, ``NotIpAddress``).
- "Access Alibaba Cloud in a specified period of time",
  https://www.alibabacloud.com/help/en/ram/user-guide/access-alibaba-cloud-in-a-specified-period-of-time:
  ``DateLessThan`` on ``acs:CurrentTime``, ISO 8601 with an offset
  (``2019-08-12T17:00:00+08:00``).

Combination: several operators, and several keys under one operator, must all
hold (AND); several values for one key: any one matches (OR), and for the
negated operators (``...Not...``, ``NotIpAddress``) none may match.  A key the
request does not carry (``acs:SourceVpc`` outside a VPC) makes a positive
operator false and a negated one true (the documented rule of AWS IAM, whose
grammar RAM's follows; RAM's pages do not spell it out).

Fail closed: a condition key the evaluator does not know, an operator it does
not know, or a value it cannot parse is logged; an Allow statement holding it
does not apply, a Deny statement holding it does.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, Literal, TypeAlias

import structlog

__all__ = ["CONDITION_KEYS", "Decision", "RequestContext", "evaluate", "wildcard"]

log = structlog.get_logger("broker.dev.emulators.ram")

Decision: TypeAlias = Literal["Allow", "ExplicitDeny", "ImplicitDeny"]

CONDITION_KEYS: Final = frozenset(
    {
        "acs:currenttime",  # the request's time, ISO 8601 UTC
        "acs:sourceip",  # the address the request came from
        "acs:securetransport",  # "true" over HTTPS
        "acs:sourcevpc",  # the VPC the request came through (absent from the Internet)
        "oss:prefix",  # ListObjects' prefix parameter
        "oss:delimiter",  # ListObjects' delimiter parameter
    }
)
"""Condition keys (lower-case: RAM compares key names without case) the evaluator knows.

Adding one (issue 12's keys) is a line here and a value in the request's
``RequestContext.values``; a key not listed fails closed.
"""


@dataclass(frozen=True)
class RequestContext:
    """What a request asks for: RAM action, resource ARN, and condition key values.

    ``values`` maps lower-case key names to the request's value, or to None
    when the request does not carry that key.
    """

    action: str
    resource: str
    values: Mapping[str, str | None]


class _Unevaluable(Exception):
    """A condition the evaluator cannot decide (unknown key or operator, bad value)."""


def evaluate(policy: str | Mapping[str, Any], context: RequestContext) -> Decision:
    """RAM's decision for ``context`` under ``policy`` (a JSON document or its parsed form)."""
    document = json.loads(policy) if isinstance(policy, str) else policy
    statements = document.get("Statement", []) if isinstance(document, Mapping) else []
    if isinstance(statements, Mapping):
        statements = [statements]
    effects = {
        statement.get("Effect")
        for statement in statements
        if isinstance(statement, Mapping) and _applies(statement, context)
    }
    if "Deny" in effects:
        return "ExplicitDeny"
    return "Allow" if "Allow" in effects else "ImplicitDeny"


def _applies(statement: Mapping[str, Any], context: RequestContext) -> bool:
    effect = statement.get("Effect")
    if effect not in {"Allow", "Deny"}:
        return False
    if not _matches(statement, "Action", context.action, ignore_case=True):
        return False
    if not _matches(statement, "Resource", context.resource, ignore_case=False):
        return False
    condition = statement.get("Condition")
    if condition is None:
        return True
    try:
        return _conditions_hold(condition, context.values)
    except _Unevaluable as err:
        log.warning("ram_condition_not_evaluated", effect=effect, problem=str(err))
        return bool(effect == "Deny")


def _matches(statement: Mapping[str, Any], element: str, value: str, *, ignore_case: bool) -> bool:
    """``Action``/``Resource`` match, or ``NotAction``/``NotResource`` does not."""
    negated = f"Not{element}" in statement
    patterns = _as_list(statement.get(f"Not{element}" if negated else element, []))
    found = any(wildcard(str(p), ignore_case).fullmatch(value) for p in patterns)
    return found != negated


def _conditions_hold(condition: object, values: Mapping[str, str | None]) -> bool:
    if not isinstance(condition, Mapping):
        raise _Unevaluable("Condition is not an object")
    results = []
    for operator, keys in condition.items():
        test = _OPERATORS.get(str(operator))
        if test is None:
            raise _Unevaluable(f"unknown operator {operator!r}")
        if not isinstance(keys, Mapping):
            raise _Unevaluable(f"{operator}: not an object of keys")
        for key, expected in keys.items():
            results.append(_key_holds(str(operator), test, str(key), expected, values))
    return all(results)


def _key_holds(
    operator: str,
    test: Callable[[str, str], bool],
    key: str,
    expected: object,
    values: Mapping[str, str | None],
) -> bool:
    name = key.lower()
    if name not in CONDITION_KEYS:
        raise _Unevaluable(f"unknown condition key {key!r}")
    negated = operator in _NEGATED
    actual = values.get(name)
    if actual is None:
        return negated
    found = any(test(actual, _text(item)) for item in _as_list(expected))
    return not found if negated else found


def _text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    raise _Unevaluable(f"condition value {value!r} is not a string, number or boolean")


def _as_list(value: object) -> list[Any]:
    if isinstance(value, list | tuple):
        return list(value)
    return [value]


@functools.lru_cache(maxsize=256)
def wildcard(pattern: str, ignore_case: bool = False) -> re.Pattern[str]:
    """RAM wildcards: ``*`` any run of characters (also none), ``?`` one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


# --- operators: (request value, one policy value) -> bool, before negation ---


def _number(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise _Unevaluable(f"{text!r} is not a number") from None


def _date(text: str) -> float:
    """ISO 8601 with an offset or Z, compared to the second."""
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise _Unevaluable(f"{text!r} is not an ISO 8601 time") from None
    if moment.tzinfo is None:
        raise _Unevaluable(f"{text!r} has no time zone")
    return float(int(moment.timestamp()))


def _in_network(address: str, network: str) -> bool:
    try:
        parsed = ipaddress.ip_network(network, strict=False)
        ip = ipaddress.ip_address(address)
    except ValueError:
        raise _Unevaluable(f"{network!r} or {address!r} is not an IP address") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.version == parsed.version and ip in parsed


def _bool(text: str) -> str:
    lowered = text.lower()
    if lowered not in {"true", "false"}:
        raise _Unevaluable(f"{text!r} is not true or false")
    return lowered


def _compare(convert: Callable[[str], float], check: Callable[[float, float], bool]) -> Any:
    return lambda actual, expected: check(convert(actual), convert(expected))


_COMPARISONS: Final[Mapping[str, Callable[[float, float], bool]]] = {
    "Equals": lambda a, b: a == b,
    "NotEquals": lambda a, b: a == b,  # negated after the OR over values
    "LessThan": lambda a, b: a < b,
    "LessThanEquals": lambda a, b: a <= b,
    "GreaterThan": lambda a, b: a > b,
    "GreaterThanEquals": lambda a, b: a >= b,
}


def _operators() -> dict[str, Callable[[str, str], bool]]:
    table: dict[str, Callable[[str, str], bool]] = {
        "StringEquals": lambda a, b: a == b,
        "StringNotEquals": lambda a, b: a == b,
        "StringEqualsIgnoreCase": lambda a, b: a.casefold() == b.casefold(),
        "StringNotEqualsIgnoreCase": lambda a, b: a.casefold() == b.casefold(),
        "StringLike": lambda a, b: wildcard(b).fullmatch(a) is not None,
        "StringNotLike": lambda a, b: wildcard(b).fullmatch(a) is not None,
        "Bool": lambda a, b: _bool(a) == _bool(b),
        "IpAddress": _in_network,
        "NotIpAddress": _in_network,
    }
    for suffix, check in _COMPARISONS.items():
        table[f"Numeric{suffix}"] = _compare(_number, check)
        table[f"Date{suffix}"] = _compare(_date, check)
    return table


_OPERATORS: Final = _operators()
_NEGATED: Final = frozenset(name for name in _OPERATORS if "Not" in name)
