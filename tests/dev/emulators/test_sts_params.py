"""AssumeRole's parameter limits as the STS emulator checks them, without HTTP."""

from __future__ import annotations

import json

import pytest

from broker.dev.emulators.sts_errors import StsError
from broker.dev.emulators.sts_params import Grant, validate_params

ACCOUNT = "1234567890123456"
ROLE_ARN = f"acs:ram::{ACCOUNT}:role/uploader"
POLICY = json.dumps(
    {"Version": "1", "Statement": [{"Effect": "Allow", "Action": "oss:*", "Resource": "*"}]}
)


def _code(params: dict[str, str], role_max: dict[str, int] | None = None) -> str:
    with pytest.raises(StsError) as raised:
        validate_params(params, ACCOUNT, role_max or {})
    return raised.value.code


def _params(**changes: str) -> dict[str, str]:
    return {"RoleArn": ROLE_ARN, "RoleSessionName": "session-1", **changes}


def test_a_valid_request_is_granted_with_the_default_duration() -> None:
    """Role and session name alone: 3600 seconds, no policy."""
    grant = validate_params(_params(), ACCOUNT, {})
    assert grant == Grant(ROLE_ARN, "uploader", "session-1", 3600, "", None)


@pytest.mark.parametrize(
    ("params", "code"),
    [
        ({"RoleSessionName": "s1"}, "MissingRoleArn"),
        (_params(RoleArn="arn:aws:iam::1:role/x"), "InvalidParameter.RoleArn"),
        (_params(RoleArn="acs:ram::999:role/uploader"), "EntityNotExist.Role"),
        ({"RoleArn": ROLE_ARN}, "MissingRoleSessionName"),
        (_params(RoleSessionName="a"), "InvalidParameter.RoleSessionName"),
        (_params(RoleSessionName="has space"), "InvalidParameter.RoleSessionName"),
        (_params(DurationSeconds="899"), "InvalidParameter.DurationSeconds"),
        (_params(DurationSeconds="3601"), "InvalidParameter.DurationSeconds"),
        (_params(DurationSeconds="12a"), "InvalidParameter.DurationSeconds"),
        (_params(Policy="x" * 2049), "InvalidParameter.PolicySize"),
        (_params(Policy="{not json"), "InvalidParameter.PolicyGrammar"),
        (_params(Policy='{"Version": "2", "Statement": []}'), "InvalidParameter.PolicyGrammar"),
        (_params(Policy=POLICY, ExternalId="a"), "InvalidParameter.ExternalId"),
    ],
)
def test_each_limit_has_its_sts_error_code(params: dict[str, str], code: str) -> None:
    """Each documented limit is refused with STS's own error code."""
    assert _code(params) == code


def test_a_role_max_session_duration_raises_the_limit() -> None:
    """A role allowed 43200 s accepts 43200 and names that limit when refusing more."""
    role_max = {ROLE_ARN: 43200}
    grant = validate_params(_params(DurationSeconds="43200"), ACCOUNT, role_max)
    assert grant.duration_seconds == 43200
    with pytest.raises(StsError) as raised:
        validate_params(_params(DurationSeconds="43201"), ACCOUNT, role_max)
    assert raised.value.message == "The Min/Max value of DurationSeconds is 900/43200 seconds."


def test_role_max_may_be_keyed_by_role_name() -> None:
    """MaxSessionDuration given by role name applies to the role's ARN."""
    grant = validate_params(_params(DurationSeconds="7200"), ACCOUNT, {"uploader": 7200})
    assert grant.duration_seconds == 7200
