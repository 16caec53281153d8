"""One small handler per endpoint: parse → call → reply."""

from __future__ import annotations

import json
import re
from typing import Any

import structlog
from aiohttp import web

from broker.auth import extract_token, role_session_name
from broker.errors import AccessDenied, RequestInvalid
from broker.http.middleware import REQUEST_ID
from broker.http.services import SERVICES, Services
from broker.models import AssumeRoleRequest, Principal
from broker.policies import Policy, may_use, scope_for

__all__ = ["get_credentials", "healthz", "list_policies", "readyz"]

log = structlog.get_logger("broker.http")

_POLICY_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}


def _json(body: dict[str, Any], status: int = 200, *, no_store: bool = False) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(body, separators=(",", ":")),
        content_type="application/json",
        headers=_NO_STORE if no_store else None,
    )


def _authenticate(request: web.Request, services: Services) -> Principal:
    token = extract_token(request.headers.get("Authorization"), request.query)
    principal = services.authenticator.authenticate(token)
    structlog.contextvars.bind_contextvars(caller=principal.subject)
    return principal


def _usable_policy(services: Services, principal: Principal, name: str) -> Policy:
    if not _POLICY_NAME.match(name):
        raise RequestInvalid("a policy name is 1-63 characters of a-z, 0-9 and '-'")
    structlog.contextvars.bind_contextvars(policy=name)
    policy = services.policies.get(name)
    # The same 403 whether or not the policy exists: names are not disclosed.
    if policy is None or not may_use(policy, principal):
        raise AccessDenied(policy=name)
    return policy


def _min_ttl(request: web.Request, policy: Policy, margin: int) -> int:
    values = request.query.getall("min_ttl_seconds", [])
    if not values:
        return 0
    limit = policy.duration_seconds - margin
    if len(values) > 1 or not values[0].isdigit() or int(values[0]) > limit:
        raise RequestInvalid(f"min_ttl_seconds must be a whole number from 0 to {limit}")
    return int(values[0])


async def get_credentials(request: web.Request) -> web.Response:
    """``GET /v1/credentials/{policy}``: scoped STS credentials for this caller."""
    services = request.app[SERVICES]
    principal = _authenticate(request, services)
    policy = _usable_policy(services, principal, request.match_info["policy"])
    min_ttl = _min_ttl(request, policy, services.settings.cache.refresh_margin_seconds)
    scope = scope_for(policy, principal)
    assume = AssumeRoleRequest(
        role_arn=policy.role_arn,
        policy=scope.document,
        duration_seconds=policy.duration_seconds,
        role_session_name=role_session_name(principal),
        external_id=policy.external_id,
    )
    result = await services.cache.get(assume, min_ttl_seconds=min_ttl)
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
        "Endpoint": policy.oss_endpoint,
        "Prefix": scope.prefix,
    }
    return _json(body, no_store=True)


async def list_policies(request: web.Request) -> web.Response:
    """``GET /v1/policies``: the policies this caller may use, with its rendered prefix."""
    services = request.app[SERVICES]
    principal = _authenticate(request, services)
    usable = [policy for policy in services.policies if may_use(policy, principal)]
    return _json({"policies": [_describe(policy, principal) for policy in usable]})


def _describe(policy: Policy, principal: Principal) -> dict[str, Any]:
    return {
        "name": policy.name,
        "description": policy.description,
        "bucket": policy.bucket,
        "region": policy.region,
        "endpoint": policy.oss_endpoint,
        "prefix": scope_for(policy, principal).prefix,
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
