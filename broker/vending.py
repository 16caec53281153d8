"""The use cases: issue credentials, presign a URL, sign a post policy; values in, values out.

Each use case takes the services, the authenticated caller and what it asked
for, and returns a frozen value; ``broker.http.routes`` only parses requests
and writes these values as replies.  Nothing here knows HTTP.  Every use case
first resolves the caller's scope of the policy it names (the same
``AccessDenied`` whether or not that policy exists), then asks the credential
cache for a token.  Signing tokens are asked to cover the lifetime wanted for
the URL or form; when STS cannot give a fresh one, the still-valid token signs
and the lifetime is clamped to what it has left (``Expiry.clamped``).  Each
use case writes its audit record (``broker.audit``) before it returns: with
``audit.mode: required``, one that cannot be written raises ``AuditUnavailable``
and nothing is handed out.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

import structlog

from broker import audit, hot_log, signing
from broker.auth import quota_key
from broker.caller_scopes import usable_scope
from broker.credential_requests import assume_request, cache_key, keep_target, known_target
from broker.credentials.cache import CacheResult
from broker.errors import (
    RequestInvalid,
)
from broker.models import Credentials, Principal
from broker.names import format_sts_time
from broker.policies import PolicySet, Scope
from broker.post_forms import post_policy_conditions
from broker.presign_targets import presign_input, signing_scope, url_plan
from broker.ram import RamGrant
from broker.scopes import NARROWING_PARAMETERS, grant_to_sign, narrow, parse_narrowing
from broker.services import Services
from broker.signing import OssEndpoint
from broker.uploads import (
    OPERATIONS,
    Expiry,
    PostPolicyBody,
    PresignBody,
    clamp_expiry,
    key_under,
    oss_endpoint,
    resolve_operation,
    valid_key,
    wanted_validity,
)

__all__ = [
    "NARROWING_PARAMETERS",
    "IssuedCredentials",
    "SignedPostPolicy",
    "SignedUrl",
    "cached_credentials",
    "issue_credentials",
    "issued_fields",
    "presign_url",
    "sign_post_policy",
]

log = structlog.get_logger("broker.vending")

_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")


@dataclass(frozen=True, slots=True)
class IssuedCredentials:
    """Credentials for one caller under one policy, and where they may be used."""

    credentials: Credentials
    scope: Scope
    endpoint: OssEndpoint
    expires_in: int
    """Whole seconds of validity left when they were handed out."""
    cache: str
    """Where they came from: ``hit``, ``miss``, ``refresh`` or ``stale``."""
    issued_at: float
    """The clock when they were handed out (``expires_in`` counts from it)."""


@dataclass(frozen=True, slots=True)
class SignedUrl:
    """A presigned URL: the headers its user must send, and how long it lives."""

    url: str
    method: str
    signed_headers: dict[str, str]
    expiration: datetime
    expiry: Expiry


@dataclass(frozen=True, slots=True)
class SignedPostPolicy:
    """PostObject form fields: a browser POSTs them, plus ``file``, to ``host``."""

    host: str
    fields: dict[str, str]
    expiration: datetime
    expiry: Expiry


@dataclass(frozen=True, slots=True)
class _Signer:
    """Credentials to sign with, when, and the lifetime they leave the signature."""

    result: CacheResult
    signed_at: datetime
    expiry: Expiry
    expires_at: datetime
    """When what it signs stops working (``_signed_by``)."""

    @property
    def credentials(self) -> Credentials:
        return self.result.credentials


def _signed_by(result: CacheResult, now: float, expiry: Expiry) -> _Signer:
    """The signer of ``result``'s token at ``now``, for ``expiry``."""
    signed_at = datetime.fromtimestamp(now, UTC)
    return _Signer(result, signed_at, expiry, signed_at + timedelta(seconds=expiry.seconds))


async def issue_credentials(
    services: Services,
    principal: Principal,
    policy_name: str,
    min_ttl_seconds: Sequence[str] = (),
    narrowing: Mapping[str, Sequence[str]] | None = None,
) -> IssuedCredentials:
    """Credentials for ``principal`` under ``policy_name``, from the cache when it can.

    ``min_ttl_seconds``: the values sent (none, or a whole number up to the
    token's lifetime minus the refresh margin); a cached token with less left
    is replaced.  ``narrowing``: the values of ``NARROWING_PARAMETERS`` sent;
    the token covers that part of the scope only (``broker.scopes.narrow``).
    """
    if not min_ttl_seconds and not narrowing:
        issued = cached_credentials(services, principal, policy_name)
        if issued is not None:
            return issued
    return await _issue(services, principal, policy_name, min_ttl_seconds, narrowing or {})


def cached_credentials(
    services: Services, principal: Principal, policy_name: str
) -> IssuedCredentials | None:
    """``issue_credentials`` for a plain request, if it is decided and a fresh hit: at once.

    ``None`` (the caller then awaits ``issue_credentials``) unless the request
    resolved before (``known_target``), its token is a fresh hit and the audit
    record need not be waited for: nothing is handed out then.
    """
    if services.audit.waits:
        return None
    target = known_target(services, principal, policy_name)
    if target is None:
        return None
    now = services.clock()
    hit = services.cache.fresh(target.key, target.min_ttl, now)
    if hit is None:
        return None
    issued = _issued(target.scope, target.endpoint, hit, now)
    services.audit.handed("credentials_issued", principal, target.scope, **_on_record(issued))
    _log_issued(issued)
    return issued


async def _issue(
    services: Services,
    principal: Principal,
    policy_name: str,
    min_ttl_seconds: Sequence[str],
    narrowing: Mapping[str, Sequence[str]],
) -> IssuedCredentials:
    """``issue_credentials`` the whole way: resolve the scope, then the cache (or STS)."""
    plain = not min_ttl_seconds and not narrowing
    scope = _requested_scope(services.policies, principal, policy_name, narrowing)
    margin = services.settings.cache.refresh_margin_seconds
    min_ttl = _min_ttl(min_ttl_seconds, scope.policy.token_lifetime_seconds - margin)
    now = services.clock()
    result = await _credentials(services, principal, scope, min_ttl, now=now)
    if result.source != "hit":
        now = services.clock()  # STS took time: ExpiresIn counts from now
    endpoint = oss_endpoint(services.settings.oss, scope.policy)
    if plain:
        keep_target(services, principal, policy_name, scope, endpoint)
    return await _hand_out(services, principal, scope, endpoint, result, now)


async def _hand_out(
    services: Services,
    principal: Principal,
    scope: Scope,
    endpoint: OssEndpoint,
    result: CacheResult,
    now: float,
) -> IssuedCredentials:
    """The credentials as handed out at ``now``: audited, logged."""
    issued = _issued(scope, endpoint, result, now)
    await _audit_issued(services, principal, issued)
    _log_issued(issued)
    return issued


def _issued(
    scope: Scope, endpoint: OssEndpoint, result: CacheResult, now: float
) -> IssuedCredentials:
    creds = result.credentials
    return IssuedCredentials(
        credentials=creds,
        scope=scope,
        endpoint=endpoint,
        expires_in=int(creds.expires_at - now),
        cache=result.source,
        issued_at=now,
    )


def _requested_scope(
    policies: PolicySet, principal: Principal, name: str, narrowing: Mapping[str, Sequence[str]]
) -> Scope:
    """The caller's scope of policy ``name``, narrowed as the request asks."""
    scope = usable_scope(policies, principal, name)
    wanted = parse_narrowing(narrowing)
    return scope if wanted is None else narrow(scope, wanted)


async def presign_url(services: Services, principal: Principal, body: PresignBody) -> SignedUrl:
    """A V4 presigned URL for one operation on one key under one of the caller's prefixes.

    The URL is signed for the grant holding the key (``broker.scopes.grant_to_sign``),
    whose actions decide.  The policy's upload guards and a GET's
    ``response-*`` overrides are signed (``broker.uploads``): the URL's user can
    change none of them.
    """
    scope = signing_scope(services, principal, body.policy)
    operation = resolve_operation(body.method, body.operation)
    spec = OPERATIONS[operation]
    key = valid_key(body.key)
    grant = grant_to_sign(scope, key, spec.action, body.bucket, operation)
    key_under(key, grant.prefix)
    policy = scope.policy
    endpoint = oss_endpoint(services.settings.oss, policy)
    plan = url_plan(
        scope,
        endpoint,
        grant.bucket,
        body,
        lambda: presign_input(endpoint, policy, body, operation, grant.bucket, key),
    )
    requested = body.expires_seconds
    signer = _fresh_signer(services, principal, scope, requested) or await _signer(
        services, principal, scope, requested
    )
    expires = signer.expiry.seconds
    signed = signing.presign_planned(plan, signer.credentials, key, signer.signed_at, expires)
    what = {"operation": operation, "key": key}
    await _audit_signed(services, "url_presigned", principal, scope, signer, **what)
    _log_signed("url_presigned", signer, operation=operation, key=key)
    return SignedUrl(
        signed.url, signed.method, signed.signed_headers, signed.expiration, signer.expiry
    )


async def sign_post_policy(
    services: Services, principal: Principal, body: PostPolicyBody
) -> SignedPostPolicy:
    """PostObject form fields for uploads under one of the caller's prefixes, signed V4 (or V1).

    The form is for the grant holding ``key`` or ``key_prefix`` (by default the
    first grant allowing ``put``), in that grant's bucket.
    """
    scope = signing_scope(services, principal, body.policy)
    policy = scope.policy
    grant = _upload_grant(scope, body)
    form = post_policy_conditions(body, policy, grant.prefix)
    requested = body.expires_seconds
    signer = _fresh_signer(services, principal, scope, requested) or await _signer(
        services, principal, scope, requested
    )
    fields = _post_fields(body, signer, (grant.bucket, policy.region), form.conditions)
    what = {"key": body.key} if body.key else {"key_prefix": _key_prefix(body, grant)}
    await _audit_signed(services, "post_policy_signed", principal, scope, signer, **what)
    _log_signed("post_policy_signed", signer, key_condition=form.fields["key"])
    endpoint = oss_endpoint(services.settings.oss, policy)
    return SignedPostPolicy(
        host=signing.bucket_url(endpoint, grant.bucket),
        fields={**form.fields, **fields},
        expiration=signer.expires_at,
        expiry=signer.expiry,
    )


def _upload_grant(scope: Scope, body: PostPolicyBody) -> RamGrant:
    """The grant a post policy uploads under: the one holding its key (prefix), with ``put``.

    Without ``key`` or ``key_prefix``, the first grant allowing ``put`` (in
    ``bucket``, if given) is the form's; ``grant_to_sign`` then checks it.
    """
    path = body.key if body.key is not None else body.key_prefix
    if path is None:
        path = _first_upload_prefix(scope, body.bucket)
    return grant_to_sign(scope, valid_key(path), "put", body.bucket, "uploads")


def _first_upload_prefix(scope: Scope, bucket: str | None) -> str:
    for grant in scope.grants:
        if "put" in grant.actions and bucket in (None, grant.bucket):
            return grant.prefix
    return scope.prefix  # allows no uploads: grant_to_sign refuses it, naming the grant


def _min_ttl(values: Sequence[str], limit: int) -> int:
    if not values:
        return 0
    if len(values) > 1 or not _WHOLE_NUMBER.fullmatch(values[0]) or int(values[0]) > limit:
        raise RequestInvalid(f"min_ttl_seconds must be a whole number from 0 to {limit}")
    return int(values[0])


async def _credentials(
    services: Services,
    principal: Principal,
    scope: Scope,
    min_ttl: float,
    *,
    now: float,
    min_ttl_is_preference: bool = False,
) -> CacheResult:
    """A token for ``scope``: a fresh cache hit without building a request, else through STS."""
    margin = services.settings.cache.refresh_margin_seconds
    key = cache_key(principal, scope, now, refresh_margin=margin)
    # A short-lived token never has more than its lifetime less the margin to give.
    min_ttl = min(min_ttl, scope.policy.token_lifetime_seconds - margin)
    hit = services.cache.fresh(key, min_ttl, now)
    if hit is not None:
        return hit
    result = await services.cache.get(
        assume_request(principal, scope, key),
        min_ttl_seconds=min_ttl,
        min_ttl_is_preference=min_ttl_is_preference,
        charge=services.sts_quota.charge(quota_key(principal)),
        key=key,
    )
    if result.source == "stale":
        services.metrics.stale_served.inc()
        log.warning("stale_credentials_served", access_key_id=result.credentials.access_key_id)
    return result


def _fresh_signer(
    services: Services, principal: Principal, scope: Scope, requested_seconds: int | None
) -> _Signer | None:
    """``_signer``'s result at once when the cached token is a fresh hit, else ``None``."""
    policy = scope.policy
    margin = services.settings.cache.refresh_margin_seconds
    wanted = wanted_validity(requested_seconds, policy)
    # As _signer then _credentials bound it: the wanted lifetime, as far as a token gives.
    min_ttl = min(wanted, policy.duration_seconds - margin, policy.token_lifetime_seconds - margin)
    now = services.clock()
    key = cache_key(principal, scope, now, refresh_margin=margin)
    hit = services.cache.fresh(key, min_ttl, now)
    if hit is None:
        return None
    expiry = clamp_expiry(requested_seconds, policy, hit.credentials.expires_at - now)
    return _signed_by(hit, now, expiry)


async def _signer(
    services: Services, principal: Principal, scope: Scope, requested_seconds: int | None
) -> _Signer:
    """Credentials covering the wanted lifetime (as far as a fresh token could), clamped.

    If STS cannot give such a token, the still-valid one signs and the
    lifetime is clamped to what it has left.
    """
    policy = scope.policy
    wanted = wanted_validity(requested_seconds, policy)
    margin = services.settings.cache.refresh_margin_seconds
    min_ttl = min(wanted, policy.duration_seconds - margin)
    now = services.clock()
    result = await _credentials(
        services, principal, scope, min_ttl, now=now, min_ttl_is_preference=True
    )
    if result.source != "hit":
        now = services.clock()  # STS took time: the URL's lifetime counts from now
    expiry = clamp_expiry(requested_seconds, policy, result.credentials.expires_at - now)
    return _signed_by(result, now, expiry)


def _post_fields(
    body: PostPolicyBody, signer: _Signer, where: tuple[str, str], conditions: list[Any]
) -> dict[str, str]:
    """The signature fields for ``where`` (bucket, region), V4 unless the body asks for V1."""
    (bucket, region), expiration = where, signer.expires_at
    if body.signature_version == "v1":  # old browser SDKs
        return signing.post_policy_v1(
            signer.credentials,
            conditions=[{"bucket": bucket}, *conditions],
            expiration=expiration,
        )
    return signing.post_policy_v4(
        signer.credentials,
        bucket=bucket,
        region=region,
        conditions=conditions,
        expiration=expiration,
        signing_time=signer.signed_at,
    )


async def _audit_issued(
    services: Services, principal: Principal, issued: IssuedCredentials
) -> None:
    """The audit record of credentials handed out (``AuditUnavailable``: none may be)."""
    await services.audit.issued("credentials_issued", principal, issued.scope, **_on_record(issued))


def _on_record(issued: IssuedCredentials) -> _Record:
    """What an issuance's audit record says of the token handed out."""
    creds = issued.credentials
    return {
        "token": creds,
        "cache": issued.cache,
        "expiration": creds.expiration_iso(),
        "expires_in": issued.expires_in,
    }


class _Record(TypedDict):
    token: Credentials
    cache: str
    expiration: str
    expires_in: int


def _audit_signed(
    services: Services,
    event: audit.IssuanceEvent,
    principal: Principal,
    scope: Scope,
    signer: _Signer,
    **detail: str,
) -> Awaitable[None]:
    """The audit record of a URL or form (awaited): its own lifetime, the token that signed it."""
    return services.audit.issued(
        event,
        principal,
        scope,
        signer.credentials,
        cache=signer.result.source,
        expiration=format_sts_time(signer.expires_at),
        expires_in=signer.expiry.seconds,
        clamped=signer.expiry.clamped,
        **detail,
    )


def _key_prefix(body: PostPolicyBody, grant: RamGrant) -> str:
    """The key prefix a post policy allows: its grant's, or the narrower one asked for."""
    return body.key_prefix if body.key_prefix is not None else grant.prefix


def _log_issued(issued: IssuedCredentials) -> None:
    fields = issued_fields(issued.scope, issued.credentials, issued.cache)
    varying = {"expires_in": issued.expires_in}
    hot_log.emit("credentials_issued", fields, varying)  # structlog's chain, minus its cost


def issued_fields(scope: Scope, token: Credentials, cache: str) -> dict[str, Any]:
    """The repeating fields of a ``credentials_issued`` line (``expires_in`` follows them)."""
    return {
        "bucket": scope.bucket,
        "prefix": scope.prefix,
        "grants": len(scope.grants),
        "narrowed": scope.narrowed,
        "policy_digest": scope.digest[:16],
        "access_key_id": token.access_key_id,
        "expiration": token.expiration_iso(),
        "cache": cache,
    }


def _log_signed(event: str, signer: _Signer, **what: str) -> None:
    fields: dict[str, object] = {
        **what,
        "access_key_id": signer.credentials.access_key_id,
        "expires_in": signer.expiry.seconds,
        "clamped": signer.expiry.clamped,
        "cache": signer.result.source,
    }
    hot_log.emit(event, fields)
