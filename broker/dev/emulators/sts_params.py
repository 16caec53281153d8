"""AssumeRole's parameters checked as STS documents them: role, session name, duration, policy.

Limits from the AssumeRole API reference: ``RoleArn`` ``acs:ram::<account>:role/<name>``;
``RoleSessionName`` 2..64 of ``[A-Za-z0-9.@_-]``; ``DurationSeconds`` 900 up to the
role's MaxSessionDuration (3600 by default, at most 43200); ``Policy`` 1..2,048
characters of RAM policy grammar; ``ExternalId`` 2..1,224 characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from broker.dev.emulators.sts_errors import StsError

__all__ = [
    "DEFAULT_DURATION_SECONDS",
    "MAX_DURATION_SECONDS",
    "Grant",
    "validate_params",
]

DEFAULT_DURATION_SECONDS: Final = 3600
MAX_DURATION_SECONDS: Final = 43200
_MIN_DURATION_SECONDS: Final = 900
_MAX_POLICY_CHARS: Final = 2048
_ROLE_ARN = re.compile(r"acs:ram::(?P<account>\d+):role/(?P<name>[A-Za-z0-9.\-]{1,64})")
_SESSION_NAME = re.compile(r"[A-Za-z0-9.@_\-]{2,64}")
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/\-]{2,1224}", re.ASCII)


@dataclass(frozen=True)
class Grant:
    """A validated AssumeRole request."""

    role_arn: str
    role_name: str
    role_session_name: str
    duration_seconds: int
    policy: str
    source_identity: str | None


def validate_params(
    params: Mapping[str, str], account_id: str, role_max: Mapping[str, int]
) -> Grant:
    """STS's parameter checks, in the order STS documents its parameters.

    ``role_max`` is each role's MaxSessionDuration, by ARN or by role name.
    """
    role_arn, role_name = _validate_role(params.get("RoleArn"), account_id)
    session_name = _validate_session_name(params.get("RoleSessionName"))
    duration = _validate_duration(params.get("DurationSeconds"), _max_for(role_arn, role_max))
    policy = _validate_policy(params.get("Policy"))
    _validate_external_id(params.get("ExternalId"))
    source = params.get("SourceIdentity")
    return Grant(role_arn, role_name, session_name, duration, policy, source)


def _validate_role(role_arn: str | None, account_id: str) -> tuple[str, str]:
    if not role_arn:
        raise StsError("MissingRoleArn")
    match = _ROLE_ARN.fullmatch(role_arn)
    if match is None:
        raise StsError("InvalidParameter.RoleArn")
    if match["account"] != account_id:
        raise StsError("EntityNotExist.Role")
    return role_arn, match["name"]


def _max_for(role_arn: str, role_max: Mapping[str, int]) -> int:
    """The role's MaxSessionDuration: by ARN, else by role name, else 3600."""
    name = role_arn.rsplit("/", 1)[-1]
    return role_max.get(role_arn, role_max.get(name, DEFAULT_DURATION_SECONDS))


def _validate_session_name(name: str | None) -> str:
    if not name:
        raise StsError("MissingRoleSessionName")
    if _SESSION_NAME.fullmatch(name) is None:
        raise StsError("InvalidParameter.RoleSessionName")
    return name


def _validate_duration(raw: str | None, role_max: int) -> int:
    if raw is None:
        return min(DEFAULT_DURATION_SECONDS, role_max)
    limit = min(role_max, MAX_DURATION_SECONDS)
    if not raw.isdigit() or not _MIN_DURATION_SECONDS <= int(raw) <= limit:
        message = None
        if limit != DEFAULT_DURATION_SECONDS:
            message = f"The Min/Max value of DurationSeconds is 900/{limit} seconds."
        raise StsError("InvalidParameter.DurationSeconds", message)
    return int(raw)


def _validate_policy(policy: str | None) -> str:
    """Optional; when given, 1..2,048 characters of RAM policy grammar."""
    if policy is None:
        return ""
    if len(policy) > _MAX_POLICY_CHARS:
        raise StsError("InvalidParameter.PolicySize")
    try:
        document = json.loads(policy)
    except ValueError:
        raise StsError("InvalidParameter.PolicyGrammar") from None
    if not _is_policy_document(document):
        raise StsError("InvalidParameter.PolicyGrammar")
    return policy


def _is_policy_document(document: object) -> bool:
    """Version "1" and a non-empty Statement list of Effect/Action/Resource objects."""
    if not isinstance(document, dict) or document.get("Version") != "1":
        return False
    statements = document.get("Statement")
    if not isinstance(statements, list) or not statements:
        return False
    return all(_is_statement(statement) for statement in statements)


def _is_statement(statement: object) -> bool:
    if not isinstance(statement, dict) or statement.get("Effect") not in {"Allow", "Deny"}:
        return False
    return all(_is_string_or_strings(statement.get(key)) for key in ("Action", "Resource"))


def _is_string_or_strings(value: object) -> bool:
    if isinstance(value, str):
        return bool(value)
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) for v in value)


def _validate_external_id(external_id: str | None) -> None:
    if external_id is not None and _EXTERNAL_ID.fullmatch(external_id) is None:
        raise StsError("InvalidParameter.ExternalId")
