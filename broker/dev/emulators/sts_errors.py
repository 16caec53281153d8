"""The STS emulator's error answers: STS's codes, statuses and messages, in the gateway's JSON.

Error codes, HTTP statuses and messages, and where they come from:

* AssumeRole API reference, "Error codes" (alibabacloud.com/help/en/ram/api-assumerole):
  400 ``InvalidParameter.DurationSeconds`` / ``.RoleArn`` / ``.RoleSessionName`` /
  ``.ExternalId`` / ``.PolicyGrammar`` / ``.PolicySize`` (Policy 1..2,048 chars),
  404 ``EntityNotExist.Role``, 403 ``NoPermission`` (the caller may not assume the
  role), 500 ``InternalError``.
* RAM/STS FAQ "Are there API request limits for STS?": ``Throttling.Api``,
  ``Throttling.User``, ``Throttling``; sent with HTTP 400, as the POP gateway's
  common error table lists ``Throttling`` (ECS "Common error codes").
* POP common error codes (ECS "Common error codes", SDK V3 signature document
  "签名失败常见报错"): 400 ``IncompleteSignature``, 400 ``SignatureDoesNotMatch``,
  400 ``SignatureNonceUsed``, 400 ``InvalidTimeStamp.Expired`` (x-acs-date must be
  within 15 minutes), 503 ``ServiceUnavailable``, 404 ``InvalidAction.NotFound``.
  ``Missing<Param>`` / "<Param> is mandatory for this action." is the POP gateway's
  form for an absent required parameter (e.g. ``MissingSecurityToken`` in the STS
  troubleshooting page), hence ``MissingRoleArn`` / ``MissingRoleSessionName``.
* Unsure, and chosen to match the brief: ``InvalidAccessKeyId.NotFound`` is sent
  with 404 (the ECS table says 400); ``InvalidTimeStamp.Format`` and
  ``InvalidVersion`` (400) are seen in SDK error maps, not in STS's own table.

Error bodies follow the gateway's JSON shape ``{"RequestId", "HostId", "Code",
"Message", "Recommend"}``.  Secrets are never echoed.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Final

from aiohttp import web

__all__ = ["CATALOGUE", "StsError", "error_response", "request_id"]

CATALOGUE: Final[Mapping[str, tuple[int, str]]] = {
    "IncompleteSignature": (400, "The request signature does not conform to Aliyun standards."),
    "InvalidAccessKeyId.NotFound": (404, "Specified access key is not found."),
    "SignatureDoesNotMatch": (400, "Specified signature does not match our calculation."),
    "InvalidTimeStamp.Expired": (400, "Specified time stamp or date value is expired."),
    "InvalidTimeStamp.Format": (400, "Specified time stamp or date value is not well formatted."),
    "SignatureNonceUsed": (400, "Specified signature nonce was used already."),
    "InvalidAction.NotFound": (
        404,
        "Specified api is not found, please check your url and method.",
    ),
    "InvalidVersion": (400, "Specified parameter Version is not valid."),
    "MissingRoleArn": (400, "RoleArn is mandatory for this action."),
    "MissingRoleSessionName": (400, "RoleSessionName is mandatory for this action."),
    "InvalidParameter.RoleArn": (400, "The parameter RoleArn is wrongly formed."),
    "InvalidParameter.RoleSessionName": (400, "The parameter RoleSessionName is wrongly formed."),
    "InvalidParameter.DurationSeconds": (400, "The Min/Max value of DurationSeconds is 15min/1hr."),
    "InvalidParameter.PolicySize": (400, "The size of Policy must be smaller than 2048 bytes."),
    "InvalidParameter.PolicyGrammar": (400, "The parameter Policy has not passed grammar check."),
    "InvalidParameter.ExternalId": (400, "The parameter ExternalId is wrongly formed."),
    "EntityNotExist.Role": (404, "The specified Role not exists ."),
    "NoPermission": (
        403,
        "You are not authorized to do this action. You should be authorized by RAM.",
    ),
    "InternalError": (500, "STS Server Internal Error happened, please send the RequestId to us."),
    "ServiceUnavailable": (503, "The request has failed due to a temporary failure of the server."),
    "Throttling.Api": (400, "Request was denied due to api flow control."),
    "Throttling.User": (400, "Request was denied due to user flow control."),
    "Throttling": (400, "Request was denied due to flow control."),
}


class StsError(Exception):
    """An STS error answer: status, code and message from the catalogue."""

    def __init__(self, code: str, message: str | None = None) -> None:
        self.status, default = CATALOGUE[code]
        self.code = code
        self.message = message or default
        super().__init__(code)


def error_response(request: web.Request, status: int, code: str, message: str) -> web.Response:
    """An error as the STS gateway sends it, with a fresh request id."""
    rid = request_id()
    body = {
        "RequestId": rid,
        "HostId": request.host,
        "Code": code,
        "Message": message,
        "Recommend": f"https://api.aliyun.com/troubleshoot?q={code}&product=Sts&requestId={rid}",
    }
    return web.json_response(body, status=status)


def request_id() -> str:
    """A request id in STS's form (an upper-case UUID)."""
    return str(uuid.uuid4()).upper()
