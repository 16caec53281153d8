"""The only importer of the STS SDK: ``assume_role()`` over real HTTP → ``Credentials``.

``fetch()`` picks the call: ``assume_role_with_oidc()`` (AssumeRoleWithOIDC, the
caller's own token, anonymous) for a request that carries ``federation``, else
``assume_role()``; both always send the inline ``Policy``.

SDK errors are translated here, exactly once, into the broker's error tree, by
Alibaba's own rules (``_translate_response_error``, ``_translate_transport_error``):

* retryable: every ``Throttling*`` code → ``UpstreamThrottled`` (503); HTTP 5xx
  and ``ServiceUnavailable`` → ``UpstreamUnavailable`` (503); no usable answer
  (refused, reset, truncated, garbage or HTML body) → ``UpstreamUnavailable``;
  no answer in time → ``UpstreamTimeout`` (504);
* not retryable: 4xx client errors (``InvalidParameter.*``, ``NoPermission``,
  ``EntityNotExist.Role``, ``SignatureDoesNotMatch``...) and 200 answers whose
  credentials the broker refuses → ``UpstreamError`` (502).

STS's ``Expiration`` is bounded, never trusted as is (``_bounded_expiration``):
a token is served until at most *local time at the attempt's start +
DurationSeconds*, and replies that are already expired by the local clock or
further out than any accepted clock skew explains are refused.

SDK types never leave this module: the broker's own identity is a
``SourceCredential``, made by ``default_credential()`` or ``static_credential()``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar, cast

import structlog
from alibabacloud_credentials.client import Client as _SdkCredential
from alibabacloud_credentials.exceptions import CredentialException
from alibabacloud_credentials.provider import StaticAKCredentialsProvider
from alibabacloud_sts20150401 import models as sts_models
from alibabacloud_sts20150401.client import Client as StsSdkClient
from alibabacloud_tea_openapi import utils_models as openapi_models
from alibabacloud_tea_openapi.exceptions import ThrottlingException
from darabonba.exceptions import ResponseException, UnretryableException
from darabonba.runtime import RuntimeOptions

from broker.config import StsSettings
from broker.errors import (
    UpstreamError,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from broker.models import AssumeRoleRequest, Clock, Credentials, system_clock
from broker.names import STS_TIME_FORMAT

__all__ = [
    "STS_MAX_CLOCK_SKEW_SECONDS",
    "SourceCredential",
    "StsClient",
    "StsHealth",
    "default_credential",
    "is_throttling_code",
    "parse_expiration",
    "static_credential",
]

log = structlog.get_logger("broker.credentials.sts")

_Reply = TypeVar("_Reply")

STS_MAX_CLOCK_SKEW_SECONDS = 900.0
"""How far OpenAPI lets a request's ``x-acs-date`` stray from its own clock (15 minutes;
``InvalidTimeStamp.Expired`` beyond).  An STS that accepted our signature has a clock
within this of ours, which bounds how far its ``Expiration`` may honestly lie past ours."""

_SOURCE_CHECK_TTL_SECONDS = 30.0
_SKEW_LOG_THRESHOLD_SECONDS = 60.0


class SourceCredential:
    """The broker's own identity, which signs its AssumeRole calls; opaque outside this module.

    Made by ``default_credential()`` or ``static_credential()``.
    """

    __slots__ = ("_sdk",)

    def __init__(self, sdk: _SdkCredential) -> None:
        self._sdk = sdk

    def __repr__(self) -> str:
        return "SourceCredential(...)"


def default_credential() -> SourceCredential:
    """The broker's own identity from the official default chain.

    Order (alibabacloud-credentials): ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET
    environment variables → RRSA/OIDC (ALIBABA_CLOUD_ROLE_ARN,
    ALIBABA_CLOUD_OIDC_PROVIDER_ARN, ALIBABA_CLOUD_OIDC_TOKEN_FILE) →
    the Alibaba Cloud CLI profile → ~/.alibabacloud/credentials →
    the ECS instance RAM role (metadata service) → ALIBABA_CLOUD_CREDENTIALS_URI.
    """
    return SourceCredential(_SdkCredential())


def static_credential(access_key_id: str, access_key_secret: str) -> SourceCredential:
    """A fixed AccessKey, for dev mode and tests against the emulator."""
    provider = StaticAKCredentialsProvider(
        access_key_id=access_key_id, access_key_secret=access_key_secret
    )
    return SourceCredential(_SdkCredential(provider=provider))


@dataclass(slots=True)
class StsHealth:
    """What the latest AssumeRole attempts say about STS itself (shown by ``/readyz``).

    A retryable failure (throttled, 5xx, unreachable, timed out) counts against
    STS; any answer STS really gave, even a refusal, proves it is up.
    """

    attempts: int = 0
    consecutive_failures: int = 0
    last_error: str | None = None

    def record(self, error: UpstreamError | None) -> None:
        """Count one finished attempt: ``None`` for success."""
        self.attempts += 1
        if error is not None and error.retryable:
            self.consecutive_failures += 1
            self.last_error = error.code
        else:
            self.consecutive_failures = 0
            self.last_error = None

    @property
    def state(self) -> Literal["unknown", "ok", "degraded"]:
        """``unknown`` before any attempt, ``degraded`` while the latest ones failed."""
        if self.attempts == 0:
            return "unknown"
        return "degraded" if self.consecutive_failures else "ok"


class StsClient:
    """Calls AssumeRole with the official async SDK; one attempt per call, bounded in time.

    Retrying is the caller's decision: the SDK's own retry loop sleeps
    synchronously, so it stays off (``Config.retry_options`` unset).  Each
    call builds a new request, so every retry is signed with a new
    ``x-acs-signature-nonce`` and ``x-acs-date`` (alibabacloud_tea_openapi
    client.py ``do_request_async``, lines 1818-1819 in 0.4.6).
    """

    def __init__(
        self,
        settings: StsSettings,
        *,
        credential: SourceCredential | None = None,
        clock: Clock = system_clock,
        min_validity_seconds: float = 60.0,
    ) -> None:
        self._settings = settings
        source = credential if credential is not None else default_credential()
        self._credential = source._sdk  # unwrapped here only: SDK types stay in this module
        self._clock = clock
        self._min_validity_seconds = min_validity_seconds
        timeout_ms = int(settings.timeout_seconds * 1000)
        self._sdk = StsSdkClient(
            openapi_models.Config(
                credential=self._credential,
                endpoint=settings.host,
                protocol=settings.protocol,
                region_id=settings.region,
                connect_timeout=timeout_ms,
                read_timeout=timeout_ms,
            )
        )
        self._runtime = RuntimeOptions(connect_timeout=timeout_ms, read_timeout=timeout_ms)
        self._source_checked_at: float | None = None
        self.health = StsHealth()

    async def assume_role(self, request: AssumeRoleRequest) -> Credentials:
        """One AssumeRole call, always with the inline ``Policy``."""
        # Without Policy the token would carry every permission of the role.
        if not request.policy:
            raise UpstreamError("refusing to call AssumeRole without an inline policy")
        if request.effective_lifetime_seconds is not None:  # credentials/deadline.py renders it
            raise UpstreamError("refusing to call AssumeRole before the policy has its deadline")
        started_at = self._clock()
        try:
            response = await self._call(request)
            credentials = self._parse(response, request, started_at)
        except UpstreamError as err:
            self.health.record(err)
            raise
        except asyncio.CancelledError:  # cut short by the retry deadline (or shutdown)
            self.health.record(UpstreamTimeout())
            raise
        self.health.record(None)
        return credentials

    async def fetch(self, request: AssumeRoleRequest) -> Credentials:
        """AssumeRoleWithOIDC when the request carries the caller's token, else AssumeRole."""
        if request.federation is not None:
            return await self.assume_role_with_oidc(request)
        return await self.assume_role(request)

    async def assume_role_with_oidc(self, request: AssumeRoleRequest) -> Credentials:
        """One AssumeRoleWithOIDC call with the caller's token, always with the inline ``Policy``.

        The credentials never outlive the token they were got with: ``Expiration``
        is capped to the token's ``exp`` (``_capped_to_token``).
        """
        token = request.oidc_token
        if not request.policy or token is None or request.oidc_provider_arn is None:
            raise UpstreamError("refusing to call AssumeRoleWithOIDC without policy and token")
        if request.effective_lifetime_seconds is not None:  # credentials/deadline.py renders it
            raise UpstreamError("refusing to call AssumeRoleWithOIDC before the policy's deadline")
        started_at = self._clock()
        if token.expires_at - started_at <= self._min_validity_seconds:
            raise UpstreamError("the caller's OIDC token expires too soon to exchange at STS")
        try:
            response = await self._call_oidc(request, token.token, request.oidc_provider_arn)
            parsed = self._parse(cast(Any, response), request, started_at)
            credentials = self._capped_to_token(parsed, token.expires_at, request)
        except UpstreamError as err:
            self.health.record(err)
            raise
        except asyncio.CancelledError:
            self.health.record(UpstreamTimeout())
            raise
        self.health.record(None)
        return credentials

    async def _call_oidc(
        self, request: AssumeRoleRequest, token: str, provider_arn: str
    ) -> sts_models.AssumeRoleWithOIDCResponse:
        """The SDK's anonymous RPC call (``assume_role_with_oidcwith_options_async``)."""
        sdk_request = sts_models.AssumeRoleWithOIDCRequest(
            oidcprovider_arn=provider_arn,
            oidctoken=token,
            role_arn=request.role_arn,
            role_session_name=request.role_session_name,
            duration_seconds=request.duration_seconds,
            policy=request.policy,
        )
        call = self._sdk.assume_role_with_oidcwith_options_async
        return await self._within_deadline(call(sdk_request, self._runtime), request.role_arn)

    def _capped_to_token(
        self, credentials: Credentials, token_expires_at: float, request: AssumeRoleRequest
    ) -> Credentials:
        """``credentials`` expiring no later than the token (whole seconds, rounded down)."""
        cap = math.floor(token_expires_at)
        if credentials.expires_at <= cap:
            return credentials
        if cap - self._clock() <= self._min_validity_seconds:
            raise UpstreamError(
                "the caller's OIDC token expires within the refresh margin",
                role_arn=request.role_arn,
            )
        return dataclasses.replace(credentials, expiration=datetime.fromtimestamp(cap, UTC))

    async def _call(self, request: AssumeRoleRequest) -> sts_models.AssumeRoleResponse:
        sdk_request = sts_models.AssumeRoleRequest(
            role_arn=request.role_arn,
            role_session_name=request.role_session_name,
            duration_seconds=request.duration_seconds,
            policy=request.policy,
            external_id=request.external_id,
        )
        call = self._sdk.assume_role_with_options_async
        return await self._within_deadline(call(sdk_request, self._runtime), request.role_arn)

    async def _within_deadline(self, call: Awaitable[_Reply], role_arn: str) -> _Reply:
        """``call``'s reply within ``timeout_seconds``; SDK failures as the broker's errors."""
        try:
            async with asyncio.timeout(self._settings.timeout_seconds):
                return await call
        except TimeoutError as err:
            raise UpstreamTimeout(role_arn=role_arn) from err
        except ResponseException as err:
            raise _translate_response_error(err, role_arn) from err
        except UnretryableException as err:
            raise _translate_transport_error(err, role_arn) from err

    def _parse(
        self, response: sts_models.AssumeRoleResponse, request: AssumeRoleRequest, started_at: float
    ) -> Credentials:
        body = response.body
        creds = body.credentials if body is not None else None
        role_arn = request.role_arn
        if creds is None:
            raise UpstreamError("STS reply carries no credentials", role_arn=role_arn)
        fields = (creds.access_key_id, creds.access_key_secret, creds.security_token)
        if not all(isinstance(value, str) and value for value in fields):
            raise UpstreamError("STS reply has incomplete credentials", role_arn=role_arn)
        return Credentials(
            access_key_id=creds.access_key_id,
            access_key_secret=creds.access_key_secret,
            security_token=creds.security_token,
            expiration=self._bounded_expiration(creds.expiration, request, started_at),
            sts_request_id=body.request_id if isinstance(body.request_id, str) else None,
        )

    def _bounded_expiration(
        self, value: object, request: AssumeRoleRequest, started_at: float
    ) -> datetime:
        """STS's ``Expiration``, at most ``started_at + DurationSeconds``; absurd or spent: refused.

        The token cannot outlive what was asked, counted from before STS saw the
        request, so the cap holds on the local clock whatever STS's clock says
        (a local clock behind STS's makes ``Expiration`` look later than it is).
        A clock ahead of STS's makes ``Expiration`` look earlier: that earlier
        time is kept, so credentials refresh early rather than ever being served
        expired.  Further out than DurationSeconds plus the largest clock skew
        OpenAPI accepts (and the attempt's own duration) is no clock skew: refused.
        """
        stated = parse_expiration(value).timestamp()
        asked = started_at + request.duration_seconds
        allowed = asked + STS_MAX_CLOCK_SKEW_SECONDS + self._settings.timeout_seconds
        if stated > allowed:
            raise UpstreamError(
                "STS reply has an Expiration further out than DurationSeconds allows",
                role_arn=request.role_arn,
                expiration=str(value),
            )
        _note_skew(stated - asked)
        expires_at = math.floor(min(stated, asked))
        remaining = expires_at - self._clock()
        if remaining <= self._min_validity_seconds:
            raise UpstreamError(
                "STS returned credentials that expire within the refresh margin "
                "(or have expired: check this host's clock)",
                role_arn=request.role_arn,
                remaining_seconds=round(remaining),
            )
        return datetime.fromtimestamp(expires_at, UTC)

    async def check_source_credentials(self) -> bool:
        """True when the broker's own identity can be resolved (cached for 30 s)."""
        now = self._clock()
        checked = self._source_checked_at
        if checked is not None and now - checked < _SOURCE_CHECK_TTL_SECONDS:
            return True
        try:
            async with asyncio.timeout(self._settings.timeout_seconds):
                model = await self._credential.get_credential_async()
        except Exception as err:  # the chain raises many unrelated types
            log.warning("source_credentials_unavailable", error_type=type(err).__name__)
            return False
        if not getattr(model, "access_key_id", None):
            return False
        self._source_checked_at = now
        return True


def parse_expiration(value: object) -> datetime:
    """STS's ``2026-11-21T05:00:00Z`` as an aware UTC datetime; anything else is an error."""
    if not isinstance(value, str):
        raise UpstreamError("STS reply has no Expiration")
    try:
        parsed = datetime.strptime(value, STS_TIME_FORMAT)
    except ValueError as err:
        raise UpstreamError("STS reply has an unparseable Expiration") from err
    return parsed.replace(tzinfo=UTC)


def _note_skew(offset_seconds: float) -> None:
    """Log when ``Expiration`` says STS's clock is far from ours (offset includes latency)."""
    if abs(offset_seconds) > _SKEW_LOG_THRESHOLD_SECONDS:
        log.warning("sts_clock_skew_suspected", sts_ahead_by_seconds=round(offset_seconds))


def is_throttling_code(code: str) -> bool:
    """Every ``Throttling`` code: ``Throttling``, ``Throttling.User``, ``.Api``, ``.Tenant``..."""
    return code.startswith("Throttling")


def _translate_response_error(err: ResponseException, role_arn: str) -> UpstreamError:
    """An STS error answer, classified as the SDK and Alibaba's docs do.

    alibabacloud_tea_openapi 0.4.6 ``client.py`` ``do_request_async`` (the
    ACS3 path AssumeRole takes), lines 1891-1936: an ``x-acs-retry-after``
    header makes a ``ThrottlingException``, whose ``retry_after`` is in
    milliseconds (``utils.py`` ``get_throttling_time_left``; darabonba 1.0.9
    ``core.py`` ``get_backoff_time``, lines 606-619, hands it to
    ``sleep(millisecond)``, line 626); otherwise 400 ≤ status < 500 is a
    ``ClientException`` and status ≥ 500 a ``ServerException``.  STS sends its
    flow-control codes (``Throttling``, ``Throttling.User``, ``Throttling.Api``:
    RAM/STS FAQ "Are there API request limits for STS?") with HTTP 400, so
    without that header they arrive as ``ClientException``: they are matched
    by prefix, which also covers codes not listed there (``Throttling.Tenant``).
    """
    code = str(getattr(err, "code", "") or "Unknown")
    status = getattr(err, "status_code", None)
    context: dict[str, Any] = {"role_arn": role_arn, "sts_code": code, "sts_status": status}
    context["sts_request_id"] = getattr(err, "request_id", None)
    if is_throttling_code(code) or isinstance(err, ThrottlingException):
        return UpstreamThrottled(retry_after=_retry_after_seconds(err), **context)
    if (isinstance(status, int) and status >= 500) or code == "ServiceUnavailable":
        return UpstreamUnavailable(f"STS is unavailable ({code}); retry later", **context)
    return UpstreamError(f"STS AssumeRole failed: {code}", **context)


def _retry_after_seconds(err: ResponseException) -> int:
    """The SDK's ``retry_after`` (milliseconds) in whole seconds, at least 1."""
    millis = getattr(err, "retry_after", None)
    if not isinstance(millis, int | float) or millis <= 0:
        return 1
    return max(1, math.ceil(millis / 1000))


def _translate_transport_error(err: UnretryableException, role_arn: str) -> UpstreamError:
    """No usable answer: the SDK wraps whatever went wrong before one (client.py line 1981).

    A timeout is ``UpstreamTimeout``; the broker's own identity failing to
    resolve is not STS's fault and not retried; anything else (refused, reset,
    truncated, a body that is not STS's JSON) is ``UpstreamUnavailable``.
    """
    inner = getattr(err, "inner_exception", None)
    error_type = type(inner).__name__
    if isinstance(inner, TimeoutError):
        return UpstreamTimeout(role_arn=role_arn, error_type=error_type)
    if isinstance(inner, CredentialException):
        return UpstreamError(
            "the broker's own credentials could not be resolved",
            role_arn=role_arn,
            error_type=error_type,
        )
    return UpstreamUnavailable(
        "STS could not be reached or sent no usable reply; retry later",
        role_arn=role_arn,
        error_type=error_type,
    )
