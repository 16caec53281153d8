"""An STS emulator: answers ``AssumeRole`` (and ``AssumeRoleWithOIDC``) as the official SDK expects.

The official async SDK (``alibabacloud_sts20150401`` on ``alibabacloud_tea_openapi``)
sends ``POST /`` with the parameters in the query string and signs the request
with ACS3-HMAC-SHA256 (the "V3" signature).  The emulator checks the signature
(``sts_signature``), ``x-acs-date`` and the nonce (a replayed nonce is
``SignatureNonceUsed``, as OpenAPI answers), validates the parameters with
STS's documented limits (``sts_params``), and issues random credentials that
it remembers (``issued``, ``lookup_security_token``), so the OSS emulator can
check the tokens it is shown.  ``AssumeRoleWithOIDC`` (RPC style, anonymous)
is checked by ``sts_oidc`` against the ``oidc_providers`` given.  Errors are
STS's (``sts_errors`` lists their sources); ``sts_faults`` injects faults on
demand, scriptable at run time over ``/__emulator__/faults`` (so dev mode can show them too)::

    curl -X POST $STS/__emulator__/faults -d '{"every_nth": 2, "nth_outcome": "error:500"}'
    curl -X POST $STS/__emulator__/faults -d '{"sequence": ["throttle:Throttling.User", "ok"]}'
    curl -X DELETE $STS/__emulator__/faults
    curl $STS/__emulator__/calls        # {"received", "calls", "issued", "outcomes"}

Two clocks: ``clock`` dates what is issued (tests move it by hand); the
freshness of ``x-acs-date`` is checked against the real time, since the SDK
signs with it.  ``clock_skew_seconds`` moves both.  Secrets are never logged
or echoed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import secrets
import string
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final
from urllib.parse import parse_qsl

from aiohttp import web

from broker.dev.emulators import serve_app
from broker.dev.emulators.sts_errors import StsError, error_response, request_id
from broker.dev.emulators.sts_faults import Outcome, Plan, StsFaults, fault_response
from broker.dev.emulators.sts_oidc import OidcProvider, VerifiedToken, verify_oidc_request
from broker.dev.emulators.sts_params import (
    DEFAULT_DURATION_SECONDS,
    MAX_DURATION_SECONDS,
    Grant,
    validate_params,
)
from broker.dev.emulators.sts_signature import (
    Authorization,
    caller_of,
    check_action,
    check_signature,
)
from broker.models import Clock, system_clock

__all__ = [
    "IssuedCredentials",
    "OidcProvider",
    "RecordedCall",
    "StsEmulator",
    "StsFaults",
    "start_sts_emulator",
]

_WIRE_TIME: Final = "%Y-%m-%dT%H:%M:%SZ"
_ALPHANUMERIC: Final = string.ascii_letters + string.digits


@dataclass(frozen=True)
class RecordedCall:
    """One AssumeRole request as received, and how it was answered.

    ``nonce`` and ``date`` are its ``x-acs-signature-nonce`` and ``x-acs-date``
    as sent (checked only when the request got as far as its signature check).
    """

    params: Mapping[str, str]
    access_key_id: str
    outcome: str
    nonce: str = ""
    date: str = ""


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


class StsEmulator:
    """STS's AssumeRole, in memory: signature checks, STS limits, faults.

    Token lifetime: DurationSeconds; at most ``lifetime_seconds`` when that is
    set; exactly ``issued_lifetime_seconds`` when that is set, whatever
    DurationSeconds says (dev mode's short-lived tokens).
    """

    def __init__(
        self,
        *,
        access_keys: Mapping[str, str],
        clock: Clock = system_clock,
        lifetime_seconds: int | None = None,
        role_max_duration_seconds: Mapping[str, int] | None = None,
        max_request_skew_seconds: float = 900.0,
        account_id: str = "1234567890123456",
        issued_lifetime_seconds: int | None = None,
        oidc_providers: Mapping[str, OidcProvider] | None = None,
    ) -> None:
        self._access_keys = dict(access_keys)
        self.oidc_providers = dict(oidc_providers or {})  # AssumeRoleWithOIDC, by provider ARN
        self._clock = clock
        self._lifetime_seconds = lifetime_seconds
        self._role_max = dict(role_max_duration_seconds or {})
        for role, seconds in self._role_max.items():
            if not DEFAULT_DURATION_SECONDS <= seconds <= MAX_DURATION_SECONDS:
                raise ValueError(f"role {role!r}: max duration must be 3600..43200 seconds")
        self._max_skew_seconds = max_request_skew_seconds
        self._account_id = account_id
        # Dev only (sts-broker dev --token-lifetime): tokens live this long, whatever
        # DurationSeconds asked for; requests are still validated against 900..43200.
        self._issued_lifetime_seconds = issued_lifetime_seconds
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
        """Answer one AssumeRole request: faults, then STS's checks, then credentials."""
        self.received += 1
        body = await request.read()
        params = _request_params(request, body)
        plan = self.faults.take()
        if plan.delay_seconds > 0:
            await asyncio.sleep(plan.delay_seconds)
        outcome = plan.outcome
        if outcome is not None and outcome.early:
            self._record(request, params, f"fault:{outcome.label}")
            return await fault_response(request, outcome)
        if params.get("Action") == _OIDC_ACTION:
            return await self._answer_oidc(request, params, plan)
        try:
            self._authenticate(request, body, plan.clock_skew_seconds)
            if outcome is not None and outcome.refusal:
                self._record(request, params, f"fault:{outcome.label}")
                return await fault_response(request, outcome)
            grant = validate_params(params, self._account_id, self._role_max)
        except StsError as err:
            self._record(request, params, err.code)
            return error_response(request, err.status, err.code, err.message)
        return self._grant_response(request, params, grant, plan)

    async def _answer_oidc(
        self, request: web.Request, params: Mapping[str, str], plan: Plan
    ) -> web.StreamResponse:
        """AssumeRoleWithOIDC: anonymous; the token stands in for the signature (``sts_oidc``)."""
        outcome = plan.outcome
        try:
            now = self._clock() + plan.clock_skew_seconds
            token = verify_oidc_request(params, self.oidc_providers, self._account_id, now)
            if outcome is not None and outcome.refusal:
                self._record(request, params, f"fault:{outcome.label}")
                return await fault_response(request, outcome)
            # RoleSessionName is optional here (STS then names the session itself).
            named = {"RoleSessionName": f"oidc.{token.subject}"[:64], **params}
            grant = validate_params(named, self._account_id, self._role_max)
        except StsError as err:
            self._record(request, params, err.code)
            return error_response(request, err.status, err.code, err.message)
        return self._grant_response(request, params, grant, plan, token)

    def _record(self, request: web.Request, params: Mapping[str, str], outcome: str) -> None:
        headers = request.headers
        kept = {k: ("<redacted>" if k == "OIDCToken" else v) for k, v in params.items()}
        self.calls.append(
            RecordedCall(
                MappingProxyType(kept),
                caller_of(headers.get("Authorization", "")),
                outcome,
                nonce=headers.get("x-acs-signature-nonce", ""),
                date=headers.get("x-acs-date", ""),
            )
        )

    def _authenticate(self, request: web.Request, body: bytes, skew_seconds: float) -> None:
        """Check Authorization, the signature, x-acs-date and the nonce."""
        authorization = Authorization.parse(request.headers.get("Authorization", ""))
        secret = self._access_keys.get(authorization.access_key_id)
        if secret is None:
            raise StsError("InvalidAccessKeyId.NotFound")
        check_signature(request, authorization, body, secret)
        self._check_date(request.headers["x-acs-date"], time.time() + skew_seconds)
        self._check_nonce(request.headers.get("x-acs-signature-nonce"))
        check_action(request)

    def _check_date(self, value: str, now: float) -> None:
        """x-acs-date must be within the allowed skew of STS's clock (``now``)."""
        try:
            signed_at = datetime.strptime(value, _WIRE_TIME).replace(tzinfo=UTC).timestamp()
        except ValueError:
            raise StsError("InvalidTimeStamp.Format") from None
        if abs(now - signed_at) > self._max_skew_seconds:
            raise StsError("InvalidTimeStamp.Expired")

    def _check_nonce(self, nonce: str | None) -> None:
        """A nonce may be used once within the freshness window."""
        if not nonce:
            return
        now = time.time()
        horizon = now - 2 * self._max_skew_seconds
        self._nonces = {key: seen for key, seen in self._nonces.items() if seen > horizon}
        if nonce in self._nonces:
            raise StsError("SignatureNonceUsed")
        self._nonces[nonce] = now

    def _grant_response(
        self,
        request: web.Request,
        params: Mapping[str, str],
        grant: Grant,
        plan: Plan,
        oidc: VerifiedToken | None = None,
    ) -> web.Response:
        """Issue credentials and answer like STS (or spoil the answer, if the plan says so)."""
        spoiler = plan.outcome if plan.outcome is not None and plan.outcome.spoils else None
        issued = self._issue(grant, plan.clock_skew_seconds, spoiler)
        if spoiler is None or spoiler.kind != "credentials":
            self._remember(issued)
        self._record(request, params, "issued" if spoiler is None else f"fault:{spoiler.label}")
        body = _success_body(self._account_id, grant, issued)
        if oidc is not None:
            body["OIDCTokenInfo"] = _token_info(oidc)
        if spoiler is not None:
            _spoil(body, spoiler)
        return web.json_response(body)

    def _issue(
        self, grant: Grant, skew_seconds: float, spoiler: Outcome | None
    ) -> IssuedCredentials:
        now = int(self._clock() + skew_seconds)
        lifetime = grant.duration_seconds
        if self._lifetime_seconds is not None:
            lifetime = min(lifetime, self._lifetime_seconds)
        if self._issued_lifetime_seconds is not None:
            lifetime = self._issued_lifetime_seconds
        expired = spoiler is not None and spoiler.arg == "past"
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
_OIDC_ACTION: Final = "AssumeRoleWithOIDC"


def _token_info(token: VerifiedToken) -> dict[str, Any]:
    """``OIDCTokenInfo`` of the reply (field names: the SDK's response model)."""
    info: dict[str, Any] = {
        "Subject": token.subject,
        "Issuer": token.issuer,
        "ClientIds": ",".join(token.client_ids),
        "ExpirationTime": datetime.fromtimestamp(token.expires_at, UTC).strftime(_WIRE_TIME),
    }
    if token.issued_at is not None:
        info["IssuanceTime"] = datetime.fromtimestamp(token.issued_at, UTC).strftime(_WIRE_TIME)
    return info


def _random_text(length: int) -> str:
    return "".join(secrets.choice(_ALPHANUMERIC) for _ in range(length))


def _request_params(request: web.Request, body: bytes) -> dict[str, str]:
    """RPC parameters: the query string, plus a form body if one was sent."""
    params = dict(request.query)
    if request.content_type == "application/x-www-form-urlencoded" and body:
        form = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
        params.update({key: value for key, value in form if key not in params})
    return params


def _spoil(body: dict[str, Any], spoiler: Outcome) -> None:
    """Spoil a success body as ``spoiler`` says (the issued token itself stays real)."""
    if spoiler.kind == "credentials":
        del body["Credentials"]
    elif spoiler.arg == "missing":
        del body["Credentials"]["Expiration"]
    elif spoiler.arg == "far_future":
        body["Credentials"]["Expiration"] = "9999-12-31T23:59:59Z"
    elif spoiler.arg == "unparseable":
        body["Credentials"]["Expiration"] = "Wed, 02 Dec 2026 07:19:58 GMT"


def _success_body(account_id: str, grant: Grant, issued: IssuedCredentials) -> dict[str, Any]:
    """The AssumeRole response body, as documented."""
    role_id = int.from_bytes(hashlib.sha256(grant.role_arn.encode()).digest()[:6], "big")
    body: dict[str, Any] = {
        "RequestId": request_id(),
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
    """Requests received, answered (``calls``), answered with credentials, and each outcome."""
    emulator = request.app[_EMULATOR]
    return web.json_response(
        {
            "received": emulator.received,
            "calls": len(emulator.calls),
            "issued": emulator.assume_role_calls(),
            "outcomes": [call.outcome for call in emulator.calls],
        }
    )


async def start_sts_emulator(
    emulator: StsEmulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the emulator on ``host:port`` (0 picks a free port); returns runner and base URL."""
    return await serve_app(emulator.make_app(), host, port)
