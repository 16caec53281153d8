"""The only importer of the STS SDK: ``assume_role()`` over real HTTP → ``Credentials``.

SDK errors are translated here, exactly once, into the broker's error tree;
SDK types never leave this module: the broker's own identity is a
``SourceCredential``, made by ``default_credential()`` or ``static_credential()``.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import structlog
from alibabacloud_credentials.client import Client as _SdkCredential
from alibabacloud_credentials.provider import StaticAKCredentialsProvider
from alibabacloud_sts20150401 import models as sts_models
from alibabacloud_sts20150401.client import Client as StsSdkClient
from alibabacloud_tea_openapi import utils_models as openapi_models
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
    "THROTTLING_CODES",
    "SourceCredential",
    "StsClient",
    "default_credential",
    "parse_expiration",
    "static_credential",
]

log = structlog.get_logger("broker.credentials.sts")

THROTTLING_CODES = frozenset({"Throttling", "Throttling.User", "Throttling.Api"})
_SOURCE_CHECK_TTL_SECONDS = 30.0


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


class StsClient:
    """Calls AssumeRole with the official async SDK; one attempt per call, bounded in time.

    Retrying is the caller's decision: the SDK's own retry loop sleeps
    synchronously, so it stays off.
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

    async def assume_role(self, request: AssumeRoleRequest) -> Credentials:
        """One AssumeRole call, always with the inline ``Policy``."""
        # Without Policy the token would carry every permission of the role.
        if not request.policy:
            raise UpstreamError("refusing to call AssumeRole without an inline policy")
        if request.effective_lifetime_seconds is not None:  # credentials/deadline.py renders it
            raise UpstreamError("refusing to call AssumeRole before the policy has its deadline")
        sdk_request = sts_models.AssumeRoleRequest(
            role_arn=request.role_arn,
            role_session_name=request.role_session_name,
            duration_seconds=request.duration_seconds,
            policy=request.policy,
            external_id=request.external_id,
        )
        try:
            async with asyncio.timeout(self._settings.timeout_seconds):
                response = await self._sdk.assume_role_with_options_async(
                    sdk_request, self._runtime
                )
        except TimeoutError as err:
            raise UpstreamTimeout(role_arn=request.role_arn) from err
        except ResponseException as err:
            raise _translate_response_error(err, request.role_arn) from err
        except UnretryableException as err:
            raise _translate_transport_error(err, request.role_arn) from err
        return self._parse(response, request.role_arn)

    def _parse(self, response: sts_models.AssumeRoleResponse, role_arn: str) -> Credentials:
        body = response.body
        creds = body.credentials if body is not None else None
        if creds is None:
            raise UpstreamError("STS reply carries no credentials", role_arn=role_arn)
        fields = (creds.access_key_id, creds.access_key_secret, creds.security_token)
        if not all(isinstance(value, str) and value for value in fields):
            raise UpstreamError("STS reply has incomplete credentials", role_arn=role_arn)
        expiration = parse_expiration(creds.expiration)
        remaining = expiration.timestamp() - self._clock()
        if remaining <= self._min_validity_seconds:
            raise UpstreamError(
                "STS returned credentials that expire within the refresh margin",
                role_arn=role_arn,
                remaining_seconds=round(remaining),
            )
        return Credentials(
            access_key_id=creds.access_key_id,
            access_key_secret=creds.access_key_secret,
            security_token=creds.security_token,
            expiration=expiration,
        )

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


def _translate_response_error(err: ResponseException, role_arn: str) -> UpstreamError:
    code = str(getattr(err, "code", "") or "Unknown")
    status = getattr(err, "status_code", None)
    request_id = getattr(err, "request_id", None)
    context: dict[str, Any] = {"role_arn": role_arn, "sts_code": code, "sts_status": status}
    context["sts_request_id"] = request_id
    if code in THROTTLING_CODES:
        retry_after = getattr(err, "retry_after", None) or 1
        return UpstreamThrottled(retry_after=int(retry_after), **context)
    if status == 503 or code == "ServiceUnavailable":
        return UpstreamUnavailable(retry_after=1, **context)
    return UpstreamError(f"STS AssumeRole failed: {code}", **context)


def _translate_transport_error(err: UnretryableException, role_arn: str) -> UpstreamError:
    inner = getattr(err, "inner_exception", None)
    text = str(inner).lower()
    if isinstance(inner, TimeoutError) or "timeout" in text or "timed out" in text:
        return UpstreamTimeout(role_arn=role_arn)
    return UpstreamError(
        "STS could not be reached or sent an unreadable reply",
        role_arn=role_arn,
        error_type=type(inner).__name__,
        retryable=True,
    )
