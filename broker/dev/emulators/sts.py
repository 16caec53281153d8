"""An STS emulator: answers ``AssumeRole`` over real HTTP as the official SDK expects.

The official async SDK (``alibabacloud_sts20150401`` on ``alibabacloud_tea_openapi``)
sends ``POST /`` with the parameters in the query string and signs the request
with ACS3-HMAC-SHA256 (the "V3" signature).  The emulator rebuilds the canonical
request exactly as ``alibabacloud_tea_openapi.utils.get_authorization`` does,
checks it, validates the parameters with STS's documented limits, and issues
random credentials that it remembers (``issued``, ``lookup_security_token``),
so the OSS emulator can check the tokens it is shown.

Error codes, HTTP statuses and messages, and where they come from:

* AssumeRole API reference, "Error codes" (alibabacloud.com/help/en/ram/api-assumerole):
  400 ``InvalidParameter.DurationSeconds`` / ``.RoleArn`` / ``.RoleSessionName`` /
  ``.ExternalId`` / ``.PolicyGrammar`` / ``.PolicySize`` (Policy 1..2,048 chars),
  404 ``EntityNotExist.Role``, 500 ``InternalError``.
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
"Message", "Recommend"}``.  Secrets are never logged or echoed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import re
import secrets
import string
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import parse_qsl, quote

from aiohttp import web

from broker.dev.emulators import serve_app
from broker.dev.emulators.sts_faults import StsFaults, early_fault, late_fault, reset_connection
from broker.models import Clock, system_clock

__all__ = [
    "IssuedCredentials",
    "RecordedCall",
    "StsEmulator",
    "StsFaults",
    "start_sts_emulator",
]

_ALGORITHM: Final = "ACS3-HMAC-SHA256"
_ACTION: Final = "AssumeRole"
_VERSION: Final = "2015-04-01"
_WIRE_TIME: Final = "%Y-%m-%dT%H:%M:%SZ"
_DEFAULT_DURATION_SECONDS: Final = 3600
_MIN_DURATION_SECONDS: Final = 900
_MAX_DURATION_SECONDS: Final = 43200
_MAX_POLICY_CHARS: Final = 2048
_REQUIRED_SIGNED: Final = frozenset(
    {"host", "x-acs-action", "x-acs-version", "x-acs-date", "x-acs-content-sha256"}
)
_ROLE_ARN = re.compile(r"acs:ram::(?P<account>\d+):role/(?P<name>[A-Za-z0-9.\-]{1,64})")
_SESSION_NAME = re.compile(r"[A-Za-z0-9.@_\-]{2,64}")
_EXTERNAL_ID = re.compile(r"[\w+=,.@:/\-]{2,1224}", re.ASCII)
_AUTHORIZATION = re.compile(
    r"(?P<algorithm>\S+) Credential=(?P<credential>[^,]+),"
    r"SignedHeaders=(?P<signed>[^,]+),Signature=(?P<signature>[0-9a-f]{64})"
)
_ALPHANUMERIC: Final = string.ascii_letters + string.digits

_CATALOGUE: Final[Mapping[str, tuple[int, str]]] = {
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
    "InternalError": (500, "STS Server Internal Error happened, please send the RequestId to us."),
    "ServiceUnavailable": (503, "The request has failed due to a temporary failure of the server."),
    "Throttling.Api": (400, "Request was denied due to api flow control."),
    "Throttling.User": (400, "Request was denied due to user flow control."),
    "Throttling": (400, "Request was denied due to flow control."),
}


@dataclass(frozen=True)
class RecordedCall:
    """One AssumeRole request as received, and how it was answered."""

    params: Mapping[str, str]
    access_key_id: str
    outcome: str


@dataclass(frozen=True)
class IssuedCredentials:
    """A set of credentials the emulator handed out."""

    access_key_id: str
    access_key_secret: str = field(repr=False)
    security_token: str = field(repr=False)
    expires_at: float
    role_arn: str
    role_session_name: str
    policy: str


@dataclass(frozen=True)
class _Grant:
    """A validated AssumeRole request."""

    role_arn: str
    role_name: str
    role_session_name: str
    duration_seconds: int
    policy: str
    source_identity: str | None


class _StsError(Exception):
    """An STS error answer: status, code and message from the catalogue."""

    def __init__(self, code: str, message: str | None = None) -> None:
        self.status, default = _CATALOGUE[code]
        self.code = code
        self.message = message or default
        super().__init__(code)


class StsEmulator:
    """STS's AssumeRole, in memory: signature checks, STS limits, faults."""

    def __init__(
        self,
        *,
        access_keys: Mapping[str, str],
        clock: Clock = system_clock,
        lifetime_seconds: int | None = None,
        role_max_duration_seconds: Mapping[str, int] | None = None,
        max_request_skew_seconds: float = 900.0,
        account_id: str = "1234567890123456",
    ) -> None:
        self._access_keys = dict(access_keys)
        self._clock = clock
        self._lifetime_seconds = lifetime_seconds
        self._role_max = dict(role_max_duration_seconds or {})
        for role, seconds in self._role_max.items():
            if not _DEFAULT_DURATION_SECONDS <= seconds <= _MAX_DURATION_SECONDS:
                raise ValueError(f"role {role!r}: max duration must be 3600..43200 seconds")
        self._max_skew_seconds = max_request_skew_seconds
        self._account_id = account_id
        self._nonces: dict[str, float] = {}
        self._by_token: dict[str, IssuedCredentials] = {}
        self.faults = StsFaults()
        self.calls: list[RecordedCall] = []
        self.received = 0  # requests that have arrived, answered or not
        self.issued: dict[str, IssuedCredentials] = {}

    def lookup_security_token(self, token: str) -> IssuedCredentials | None:
        """The credentials a SecurityToken belongs to, if this emulator issued it."""
        return self._by_token.get(token)

    def assume_role_calls(self) -> int:
        """How many AssumeRole calls were answered with credentials."""
        return sum(1 for call in self.calls if call.outcome == "issued")

    def make_app(self) -> web.Application:
        """The aiohttp application: ``/`` for STS, ``/__emulator__/*`` for control."""
        app = web.Application()
        app[_EMULATOR] = self
        app.router.add_route("GET", "/", _assume_role)
        app.router.add_route("POST", "/", _assume_role)
        app.router.add_get("/__emulator__/faults", _get_faults)
        app.router.add_post("/__emulator__/faults", _set_faults)
        app.router.add_delete("/__emulator__/faults", _clear_faults)
        app.router.add_get("/__emulator__/calls", _get_calls)
        return app

    async def answer(self, request: web.Request) -> web.StreamResponse:
        """Answer one AssumeRole request, faults first."""
        self.received += 1
        body = await request.read()
        params = _request_params(request, body)
        caller = _caller_of(request.headers.get("Authorization", ""))
        faults = self.faults.take()
        if faults is not None and faults.delay_seconds > 0:
            await asyncio.sleep(faults.delay_seconds)
        early = early_fault(faults)
        if faults is not None and early is not None:
            self._record(params, caller, f"fault:{early}")
            return _fault_response(request, early, faults)
        try:
            self._authenticate(request, body)
            grant = self._validate(params)
        except _StsError as err:
            self._record(params, caller, err.code)
            return _error_json(request, err.status, err.code, err.message)
        return self._grant_response(request, params, caller, grant, faults)

    def _record(self, params: Mapping[str, str], caller: str, outcome: str) -> None:
        self.calls.append(RecordedCall(MappingProxyType(dict(params)), caller, outcome))

    def _authenticate(self, request: web.Request, body: bytes) -> None:
        """Check Authorization, the signature, x-acs-date and the nonce."""
        match = _AUTHORIZATION.fullmatch(request.headers.get("Authorization", ""))
        if match is None or match["algorithm"] != _ALGORITHM:
            raise _StsError("IncompleteSignature")
        secret = self._access_keys.get(match["credential"])
        if secret is None:
            raise _StsError("InvalidAccessKeyId.NotFound")
        signed = match["signed"].split(";")
        _check_signed_headers(request, signed)
        expected = _signature(request, signed, body, secret)
        if not hmac.compare_digest(expected, match["signature"]):
            raise _StsError("SignatureDoesNotMatch")
        self._check_date(request.headers["x-acs-date"])
        self._check_nonce(request.headers.get("x-acs-signature-nonce"))
        _check_action(request)

    def _check_date(self, value: str) -> None:
        """x-acs-date must be within the allowed skew of the real clock."""
        try:
            signed_at = datetime.strptime(value, _WIRE_TIME).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise _StsError("InvalidTimeStamp.Format") from None
        if abs(time.time() - signed_at) > self._max_skew_seconds:
            raise _StsError("InvalidTimeStamp.Expired")

    def _check_nonce(self, nonce: str | None) -> None:
        """A nonce may be used once within the freshness window."""
        if not nonce:
            return
        now = time.time()
        horizon = now - 2 * self._max_skew_seconds
        self._nonces = {key: seen for key, seen in self._nonces.items() if seen > horizon}
        if nonce in self._nonces:
            raise _StsError("SignatureNonceUsed")
        self._nonces[nonce] = now

    def _validate(self, params: Mapping[str, str]) -> _Grant:
        """STS's parameter checks, in the order STS documents its parameters."""
        role_arn, role_name = self._validate_role(params.get("RoleArn"))
        session_name = _validate_session_name(params.get("RoleSessionName"))
        duration = _validate_duration(params.get("DurationSeconds"), self._max_for(role_arn))
        policy = _validate_policy(params.get("Policy"))
        _validate_external_id(params.get("ExternalId"))
        source = params.get("SourceIdentity")
        return _Grant(role_arn, role_name, session_name, duration, policy, source)

    def _validate_role(self, role_arn: str | None) -> tuple[str, str]:
        if not role_arn:
            raise _StsError("MissingRoleArn")
        match = _ROLE_ARN.fullmatch(role_arn)
        if match is None:
            raise _StsError("InvalidParameter.RoleArn")
        if match["account"] != self._account_id:
            raise _StsError("EntityNotExist.Role")
        return role_arn, match["name"]

    def _max_for(self, role_arn: str) -> int:
        """The role's MaxSessionDuration: by ARN, else by role name, else 3600."""
        name = role_arn.rsplit("/", 1)[-1]
        return self._role_max.get(role_arn, self._role_max.get(name, _DEFAULT_DURATION_SECONDS))

    def _grant_response(
        self,
        request: web.Request,
        params: Mapping[str, str],
        caller: str,
        grant: _Grant,
        faults: StsFaults | None,
    ) -> web.Response:
        """Issue credentials (unless a fault forbids it) and answer like STS."""
        late = late_fault(faults)
        issued = self._issue(grant, expired=late == "expired_credentials")
        if late != "omit_credentials":
            self._remember(issued)
        self._record(params, caller, "issued" if late is None else f"fault:{late}")
        body = _success_body(self._account_id, grant, issued)
        if late == "omit_credentials":
            del body["Credentials"]
        elif late == "omit_expiration":
            del body["Credentials"]["Expiration"]
        return web.json_response(body)

    def _issue(self, grant: _Grant, *, expired: bool) -> IssuedCredentials:
        now = int(self._clock())
        lifetime = grant.duration_seconds
        if self._lifetime_seconds is not None:
            lifetime = min(lifetime, self._lifetime_seconds)
        expires_at = float(now - 60 if expired else now + lifetime)
        return IssuedCredentials(
            access_key_id="STS." + _random_text(24),
            access_key_secret=_random_text(40),
            security_token="CAIS" + base64.b64encode(secrets.token_bytes(300)).decode(),
            expires_at=expires_at,
            role_arn=grant.role_arn,
            role_session_name=grant.role_session_name,
            policy=grant.policy,
        )

    def _remember(self, issued: IssuedCredentials) -> None:
        self.issued[issued.access_key_id] = issued
        self._by_token[issued.security_token] = issued


_EMULATOR: Final = web.AppKey("sts_emulator", StsEmulator)


def _random_text(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def _request_params(request: web.Request, body: bytes) -> dict[str, str]:
    """RPC parameters: the query string, plus a form body if one was sent."""
    params = dict(request.query)
    if request.content_type == "application/x-www-form-urlencoded" and body:
        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params.update({key: value for key, value in form if key not in params})
    return params


def _caller_of(authorization: str) -> str:
    """The access key id named in an Authorization header, or ``""``."""
    match = _AUTHORIZATION.fullmatch(authorization)
    return match["credential"] if match else ""


def _check_signed_headers(request: web.Request, signed: list[str]) -> None:
    """Every common header present must be signed, and the required ones present."""
    names = set(signed)
    present = {name.lower() for name in request.headers}
    must_sign = _REQUIRED_SIGNED | {name for name in present if name.startswith("x-acs-")}
    if not must_sign <= names or not names <= present or signed != sorted(names):
        raise _StsError("IncompleteSignature")


def _signature(request: web.Request, signed: list[str], body: bytes, secret: str) -> str:
    """The hex ACS3-HMAC-SHA256 signature of the request as received."""
    canonical = "\n".join(
        [
            request.method,
            request.path or "/",
            _canonical_query(request.query),
            _canonical_headers(request, signed),
            ";".join(signed),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    to_sign = f"{_ALGORITHM}\n{digest}"
    return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _canonical_query(query: Mapping[str, str]) -> str:
    """As ``get_canonical_query_string``: sorted keys, values RFC 3986-encoded."""
    return "&".join(f"{key}={quote(query[key], safe='~')}" for key in sorted(query))


def _canonical_headers(request: web.Request, signed: list[str]) -> str:
    """As ``get_canonicalized_headers``: ``name:v1,v2\\n`` for each signed header."""
    lines = []
    for name in signed:
        values = sorted(value.strip() for value in request.headers.getall(name))
        lines.append(f"{name}:{','.join(values)}\n")
    return "".join(lines)


def _check_action(request: web.Request) -> None:
    if request.headers.get("x-acs-action") != _ACTION:
        raise _StsError("InvalidAction.NotFound")
    if request.headers.get("x-acs-version") != _VERSION:
        raise _StsError("InvalidVersion")


def _validate_session_name(name: str | None) -> str:
    if not name:
        raise _StsError("MissingRoleSessionName")
    if _SESSION_NAME.fullmatch(name) is None:
        raise _StsError("InvalidParameter.RoleSessionName")
    return name


def _validate_duration(raw: str | None, role_max: int) -> int:
    if raw is None:
        return min(_DEFAULT_DURATION_SECONDS, role_max)
    limit = min(role_max, _MAX_DURATION_SECONDS)
    if not raw.isdigit() or not _MIN_DURATION_SECONDS <= int(raw) <= limit:
        message = None
        if limit != _DEFAULT_DURATION_SECONDS:
            message = f"The Min/Max value of DurationSeconds is 900/{limit} seconds."
        raise _StsError("InvalidParameter.DurationSeconds", message)
    return int(raw)


def _validate_policy(policy: str | None) -> str:
    """Optional; when given, 1..2,048 characters of RAM policy grammar."""
    if policy is None:
        return ""
    if len(policy) > _MAX_POLICY_CHARS:
        raise _StsError("InvalidParameter.PolicySize")
    try:
        document = json.loads(policy)
    except ValueError:
        raise _StsError("InvalidParameter.PolicyGrammar") from None
    if not _is_policy_document(document):
        raise _StsError("InvalidParameter.PolicyGrammar")
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
        raise _StsError("InvalidParameter.ExternalId")


def _fault_response(request: web.Request, name: str, faults: StsFaults) -> web.StreamResponse:
    if name == "reset_connection":
        return reset_connection(request)
    if name == "throttle":
        code = faults.throttle_code
        status, message = _CATALOGUE.get(code, (400, "Request was denied due to flow control."))
        return _error_json(request, status, code, message)
    if name == "malformed_body":
        return web.Response(text="<html>upstream proxy error", content_type="application/json")
    status = faults.error_status or 500
    code = "ServiceUnavailable" if status == 503 else "InternalError"
    return _error_json(request, status, code, _CATALOGUE[code][1])


def _error_json(request: web.Request, status: int, code: str, message: str) -> web.Response:
    request_id = _request_id()
    body = {
        "RequestId": request_id,
        "HostId": request.host,
        "Code": code,
        "Message": message,
        "Recommend": (
            f"https://api.aliyun.com/troubleshoot?q={code}&product=Sts&requestId={request_id}"
        ),
    }
    return web.json_response(body, status=status)


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _success_body(account_id: str, grant: _Grant, issued: IssuedCredentials) -> dict[str, Any]:
    """The AssumeRole response body, as documented."""
    role_id = int.from_bytes(hashlib.sha256(grant.role_arn.encode()).digest()[:6], "big")
    body: dict[str, Any] = {
        "RequestId": _request_id(),
        "AssumedRoleUser": {
            "Arn": f"acs:ram::{account_id}:role/{grant.role_name}/{grant.role_session_name}",
            "AssumedRoleId": f"{role_id:016d}:{grant.role_session_name}",
        },
        "Credentials": {
            "AccessKeyId": issued.access_key_id,
            "AccessKeySecret": issued.access_key_secret,
            "SecurityToken": issued.security_token,
            "Expiration": datetime.fromtimestamp(issued.expires_at, UTC).strftime(_WIRE_TIME),
        },
    }
    if grant.source_identity:
        body["SourceIdentity"] = grant.source_identity
    return body


async def _assume_role(request: web.Request) -> web.StreamResponse:
    return await request.app[_EMULATOR].answer(request)


async def _get_faults(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[_EMULATOR].faults))


async def _set_faults(request: web.Request) -> web.Response:
    """Set StsFaults fields from a JSON object; 400 on an unknown field or bad value."""
    faults = request.app[_EMULATOR].faults
    try:
        changes = await request.json()
        if not isinstance(changes, dict):
            raise ValueError("expected a JSON object")
        faults.update(changes)
    except ValueError as err:
        return web.json_response({"error": str(err)}, status=400)
    return web.json_response(asdict(faults))


async def _clear_faults(request: web.Request) -> web.Response:
    faults = request.app[_EMULATOR].faults
    faults.clear()
    return web.json_response(asdict(faults))


async def _get_calls(request: web.Request) -> web.Response:
    emulator = request.app[_EMULATOR]
    return web.json_response({"calls": len(emulator.calls), "issued": emulator.assume_role_calls()})


async def start_sts_emulator(
    emulator: StsEmulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the emulator on ``host:port`` (0 picks a free port); returns runner and base URL."""
    return await serve_app(emulator.make_app(), host, port)
