"""One small handler per endpoint: parse → call → reply."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import orjson
import pydantic
import structlog
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError

from broker import signing
from broker.auth import extract_token, quota_key, role_session_name
from broker.credentials.cache import CacheResult
from broker.errors import AccessDenied, RequestInvalid, TemplateValueRejected, TooManyRequests
from broker.http.keys import SERVICES
from broker.http.middleware import REQUEST_ID
from broker.http.openapi import openapi_document
from broker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from broker.models import AssumeRoleRequest, Principal
from broker.policies import Policy, Scope
from broker.services import Services
from broker.uploads import (
    OPERATIONS,
    Expiry,
    PostPolicyBody,
    PresignBody,
    check_key,
    clamp_expiry,
    oss_endpoint,
    post_policy_conditions,
    presign_headers,
    resolve_operation,
    sub_resources,
    wanted_validity,
)

__all__ = [
    "create_post_policy",
    "create_presigned_url",
    "get_credentials",
    "healthz",
    "list_policies",
    "metrics",
    "openapi",
    "readyz",
]

_Body = TypeVar("_Body", bound=pydantic.BaseModel)

log = structlog.get_logger("broker.http")

_POLICY_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
_WHOLE_NUMBER = re.compile(r"[0-9]{1,9}")
_JSON = {"Content-Type": "application/json"}
_JSON_NO_STORE = {**_JSON, "Cache-Control": "no-store", "Pragma": "no-cache"}


def _json(body: dict[str, Any], status: int = 200, *, no_store: bool = False) -> web.Response:
    headers = _JSON_NO_STORE if no_store else _JSON
    return web.Response(status=status, body=orjson.dumps(body), headers=headers)


async def _authenticate(request: web.Request, services: Services) -> Principal:
    principal = None
    if "Authorization" not in request.headers and "access_token" not in request.query:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        principal = services.authenticator.authenticate_certificate(peercert)
    if principal is None:
        token = extract_token(request.headers.getall("Authorization", []), request.query)
        principal = await services.authenticator.authenticate(token)
    structlog.contextvars.bind_contextvars(caller=principal.subject)
    try:
        services.quotas.check(quota_key(principal))
    except TooManyRequests:
        services.metrics.quota_rejections.labels("caller").inc()
        raise
    return principal


def _usable_scope(services: Services, principal: Principal, name: str) -> Scope:
    """The caller's scope of policy ``name``: the same 403 whether or not the policy exists."""
    if not _POLICY_NAME.fullmatch(name):
        raise RequestInvalid("a policy name is 1-63 characters of a-z, 0-9 and '-'")
    structlog.contextvars.bind_contextvars(policy=name)
    scope = services.policies.scope(name, principal)
    if scope is None:
        raise AccessDenied(policy=name)
    return scope


def _min_ttl(request: web.Request, policy: Policy, margin: int) -> int:
    values = request.query.getall("min_ttl_seconds", [])
    if not values:
        return 0
    limit = policy.duration_seconds - margin
    if len(values) > 1 or not _WHOLE_NUMBER.fullmatch(values[0]) or int(values[0]) > limit:
        raise RequestInvalid(f"min_ttl_seconds must be a whole number from 0 to {limit}")
    return int(values[0])


async def _credentials_for(
    services: Services,
    policy: Policy,
    principal: Principal,
    scope: Scope,
    min_ttl: float,
    *,
    min_ttl_is_preference: bool = False,
) -> CacheResult:
    assume = AssumeRoleRequest(
        role_arn=policy.role_arn,
        policy=scope.document,
        duration_seconds=policy.duration_seconds,
        role_session_name=role_session_name(principal),
        external_id=policy.external_id,
    )
    result = await services.cache.get(
        assume, min_ttl_seconds=min_ttl, min_ttl_is_preference=min_ttl_is_preference
    )
    if result.source == "stale":
        services.metrics.stale_served.inc()
        log.warning("stale_credentials_served", access_key_id=result.credentials.access_key_id)
    return result


async def _credentials_to_sign(
    services: Services, scope: Scope, principal: Principal, requested_seconds: int | None
) -> tuple[CacheResult, float, Expiry]:
    """Credentials to sign with, the signing time, and the lifetime clamped to the token.

    A token covering the wanted lifetime is asked for (as far as a fresh one
    could give it); if STS cannot give one, the still-valid token signs and the
    lifetime is clamped to what it has left.
    """
    policy = scope.policy
    wanted = wanted_validity(requested_seconds, policy)
    margin = services.settings.cache.refresh_margin_seconds
    min_ttl = min(wanted, policy.duration_seconds - margin)
    result = await _credentials_for(
        services, policy, principal, scope, min_ttl, min_ttl_is_preference=True
    )
    now = services.clock()
    remaining = result.credentials.expires_at - now
    return result, now, clamp_expiry(requested_seconds, policy, remaining)


async def get_credentials(request: web.Request) -> web.Response:
    """``GET /v1/credentials/{policy}``: scoped STS credentials for this caller."""
    services = request.app[SERVICES]
    principal = await _authenticate(request, services)
    scope = _usable_scope(services, principal, request.match_info["policy"])
    policy = scope.policy
    min_ttl = _min_ttl(request, policy, services.settings.cache.refresh_margin_seconds)
    result = await _credentials_for(services, policy, principal, scope, min_ttl)
    creds = result.credentials
    expires_in = int(creds.expires_at - services.clock())
    log.info(
        "credentials_issued",
        bucket=policy.bucket,
        prefix=scope.prefix,
        policy_digest=scope.digest[:16],
        access_key_id=creds.access_key_id,
        expiration=creds.expiration_iso(),
        expires_in=expires_in,
        cache=result.source,
    )
    expiration = creds.expiration_iso()
    body = {
        "Code": "Success",
        "StatusCode": 200,
        "RequestId": request[REQUEST_ID],
        "AccessKeyId": creds.access_key_id,
        "AccessKeySecret": creds.access_key_secret,
        "SecurityToken": creds.security_token,
        "Expiration": expiration,
        "ExpiresIn": expires_in,
        "Credentials": {
            "AccessKeyId": creds.access_key_id,
            "AccessKeySecret": creds.access_key_secret,
            "SecurityToken": creds.security_token,
            "Expiration": expiration,
        },
        "Bucket": policy.bucket,
        "Region": policy.region,
        "Endpoint": oss_endpoint(services.settings.oss, policy).host,
        "Prefix": scope.prefix,
    }
    return _json(body, no_store=True)


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise RequestInvalid("the JSON body repeats a field")
    return dict(pairs)


async def _parse(request: web.Request, model: type[_Body]) -> _Body:
    try:
        raw = await request.read()  # bounded by client_max_size: 413 past it
    except RequestPayloadError as err:
        raise RequestInvalid("the body could not be read (bad Content-Encoding?)") from err
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError, RecursionError) as err:
        raise RequestInvalid("the body must be a JSON object") from err
    if not isinstance(data, dict):
        raise RequestInvalid("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise RequestInvalid(_describe_validation(err)) from err


def _describe_validation(err: pydantic.ValidationError) -> str:
    problems = []
    for item in err.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


async def create_presigned_url(request: web.Request) -> web.Response:
    """``POST /v1/presign``: a V4 presigned URL for one operation on one key."""
    services = request.app[SERVICES]
    principal = await _authenticate(request, services)
    body = await _parse(request, PresignBody)
    scope = _usable_scope(services, principal, body.policy)
    policy = scope.policy
    operation = resolve_operation(body.method, body.operation)
    spec = OPERATIONS[operation]
    if spec.action not in policy.actions:
        raise AccessDenied(f"policy {policy.name} does not allow {operation}")
    key = check_key(body.key, scope.prefix)
    headers = presign_headers(body, policy, operation)
    query = sub_resources(operation, body)
    result, now, expiry = await _credentials_to_sign(
        services, scope, principal, body.expires_seconds
    )
    creds = result.credentials
    presign_input = signing.PresignInput(
        method=spec.method,
        bucket=policy.bucket,
        key=key,
        region=policy.region,
        endpoint=oss_endpoint(services.settings.oss, policy),
        expires_seconds=expiry.seconds,
        headers=headers,
        query=query,
    )
    signed = signing.presign(creds, presign_input, datetime.fromtimestamp(now, UTC))
    log.info(
        "url_presigned",
        operation=operation,
        key=key,
        access_key_id=creds.access_key_id,
        expires_in=expiry.seconds,
        clamped=expiry.clamped,
        cache=result.source,
    )
    return _json(
        {
            "url": signed.url,
            "method": signed.method,
            "expiration": _iso(signed.expiration),
            "expires_in": expiry.seconds,
            "signed_headers": signed.signed_headers,
            "clamped": expiry.clamped,
            "requested_expires_seconds": expiry.requested_seconds,
        },
        no_store=True,
    )


async def create_post_policy(request: web.Request) -> web.Response:
    """``POST /v1/post-policy``: signed PostObject form fields for a browser upload."""
    services = request.app[SERVICES]
    principal = await _authenticate(request, services)
    body = await _parse(request, PostPolicyBody)
    scope = _usable_scope(services, principal, body.policy)
    policy = scope.policy
    if "put" not in policy.actions:
        raise AccessDenied(f"policy {policy.name} does not allow uploads")
    form = post_policy_conditions(body, policy, scope.prefix)
    result, now, expiry = await _credentials_to_sign(
        services, scope, principal, body.expires_seconds
    )
    creds = result.credentials
    signed_at = datetime.fromtimestamp(now, UTC)
    expiration = signed_at + timedelta(seconds=expiry.seconds)
    if body.signature_version == "v1":
        conditions = [{"bucket": policy.bucket}, *form.conditions]
        fields = signing.post_policy_v1(creds, conditions=conditions, expiration=expiration)
    else:
        fields = signing.post_policy_v4(
            creds,
            bucket=policy.bucket,
            region=policy.region,
            conditions=form.conditions,
            expiration=expiration,
            signing_time=signed_at,
        )
    log.info(
        "post_policy_signed",
        key_condition=form.fields["key"],
        access_key_id=creds.access_key_id,
        expires_in=expiry.seconds,
        clamped=expiry.clamped,
        cache=result.source,
    )
    endpoint = oss_endpoint(services.settings.oss, policy)
    return _json(
        {
            "host": signing.bucket_url(endpoint, policy.bucket),
            "fields": {**form.fields, **fields},
            "expiration": _iso(expiration),
            "expires_in": expiry.seconds,
            "clamped": expiry.clamped,
            "requested_expires_seconds": expiry.requested_seconds,
        },
        no_store=True,
    )


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def list_policies(request: web.Request) -> web.Response:
    """``GET /v1/policies``: the policies this caller may use, with its rendered prefix."""
    services = request.app[SERVICES]
    principal = await _authenticate(request, services)
    usable = []
    for policy in services.policies:
        try:
            scope = services.policies.scope(policy.name, principal)
        except TemplateValueRejected:
            continue  # this caller's identity cannot render that prefix: not usable
        if scope is not None:
            usable.append(scope)
    return _json({"policies": [_describe(services, scope) for scope in usable]})


def _describe(services: Services, scope: Scope) -> dict[str, Any]:
    policy = scope.policy
    return {
        "name": policy.name,
        "description": policy.description,
        "bucket": policy.bucket,
        "region": policy.region,
        "endpoint": oss_endpoint(services.settings.oss, policy).host,
        "prefix": scope.prefix,
        "actions": list(policy.actions),
        "duration_seconds": policy.duration_seconds,
        "max_url_expires_seconds": policy.max_url_expires_seconds,
        "content_types": list(policy.content_types),
        "max_object_bytes": policy.max_object_bytes,
    }


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is alive."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: policies loaded, source credentials available, not shutting down."""
    services = request.app[SERVICES]
    checks = {
        "policies_loaded": len(services.policies) > 0,
        "source_credentials": await services.sts.check_source_credentials(),
        "accepting_requests": not services.shutting_down,
    }
    ready = all(checks.values())
    return _json(
        {"status": "ready" if ready else "not_ready", "checks": checks}, 200 if ready else 503
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI 3.1 description of this API."""
    return _json(openapi_document())
