"""Whether an STS token's inline RAM policy lets a request act on OSS, as RAM decides.

The resource is ``acs:oss:<region>:<account>:<bucket>`` for bucket operations
(ListObjects) and ``...:<bucket>/<key>`` for object operations; the decision
is ``ram.evaluate``'s.  ``condition_values`` gathers what the emulator can
observe of a request for the condition keys ``ram`` knows.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, datetime

from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.ram import RequestContext, evaluate
from broker.dev.emulators.sts import IssuedCredentials

__all__ = ["account_of", "authorize", "condition_values"]

_ROLE_ACCOUNT = re.compile(r"acs:ram::(?P<account>\d+):role/")


def account_of(issued: IssuedCredentials) -> str:
    """The account that owns the token's role (from its ARN), "0" if it cannot be read."""
    match = _ROLE_ACCOUNT.match(issued.role_arn)
    return match["account"] if match else "0"


def condition_values(
    now: float,
    source_ip: str | None,
    *,
    secure: bool,
    list_params: Mapping[str, str] | None = None,
) -> dict[str, str | None]:
    """The condition keys' values for one request.

    ``acs:SourceIp`` is the TCP peer the emulator sees; ``acs:SecureTransport``
    is ``false`` on plain HTTP; ``acs:SourceVpc`` is absent (no VPC here);
    ``oss:Prefix``/``oss:Delimiter`` are ListObjects' parameters, absent when
    not sent (and for every other operation).
    """
    params = list_params or {}
    return {
        "acs:currenttime": datetime.fromtimestamp(int(now), UTC).isoformat(),
        "acs:sourceip": source_ip,
        "acs:securetransport": "true" if secure else "false",
        "acs:sourcevpc": None,
        "oss:prefix": params.get("prefix"),
        "oss:delimiter": params.get("delimiter"),
    }


def authorize(
    issued: IssuedCredentials,
    action: str,
    bucket: str,
    key: str | None,
    region: str,
    values: Mapping[str, str | None],
) -> None:
    """Raise AccessDenied unless the token's inline policy allows ``action`` here.

    Without an inline policy the token has its role's permissions, which the
    emulator does not model: it allows.
    """
    if not issued.policy:
        return
    resource = f"acs:oss:{region}:{account_of(issued)}:{bucket}"
    if key is not None:
        resource += f"/{key}"
    decision = evaluate(issued.policy, RequestContext(action, resource, values))
    if decision != "Allow":
        detail = {"AuthAction": action, "NoPermissionType": decision}
        raise OssError(
            "AccessDenied",
            "Access denied by authorizer's policy.",
            ec="0003-00000301",
            details={"AccessDeniedDetail": detail},
        )
