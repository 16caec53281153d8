"""One small handler per endpoint: parse → vending → reply."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, TypeVar

import orjson
import pydantic
from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from multidict import MultiDict, MultiDictProxy, MultiMapping

from broker import request_context, vending
from broker.auth import extract_token, quota_key
from broker.caller_scopes import usable_scopes
from broker.errors import AccessDenied, RequestInvalid
from broker.http.client_address import client_address
from broker.http.keys import ADMISSIONS, REPLIES, SERVICES
from broker.http.middleware import REQUEST_ID
from broker.http.openapi import openapi_document
from broker.http.replies import json_response as _json
from broker.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from broker.models import Principal
from broker.names import format_sts_time
from broker.policies import Scope
from broker.ram import RamGrant
from broker.services import Services
from broker.uploads import PostPolicyBody, PresignBody, oss_endpoint

__all__ = [
    "create_post_policy",
    "create_presigned_url",
    "get_credentials",
    "healthz",
    "list_policies",
    "may_use_route",
    "metrics",
    "openapi",
    "readyz",
]

_Body = TypeVar("_Body", bound=pydantic.BaseModel)

_ROUTE_TITLES = {
    "credentials": "GET /v1/credentials/{policy}",
    "presign": "POST /v1/presign",
    "post_policy": "POST /v1/post-policy",
    "policies": "GET /v1/policies",
}
"""What ``auth.api_keys[].allow.routes`` may name (``broker.config.ApiRoute``), for messages."""


async def _authenticate(request: web.Request, services: Services) -> Principal:
    return _remembered(request, services) or await _authenticated(request, services)


async def _authenticated(request: web.Request, services: Services) -> Principal:
    """The caller, authenticated the whole way (and remembered, for an API key)."""
    query = _query(request)
    headers = request.headers.getall("Authorization", ())
    principal = None
    if not headers and "access_token" not in query:
        peercert = request.transport.get_extra_info("peercert") if request.transport else None
        principal = services.authenticator.authenticate_certificate(peercert)
    if principal is None:
        token = extract_token(headers, query)
        principal = await services.authenticator.authenticate(token)
    principal = _with_source_ip(request, services, principal)
    quota = quota_key(principal)
    _admit(request, services, principal, quota)
    if len(headers) == 1 and not query:
        request.app[ADMISSIONS].keep(request, services, headers[0], principal, quota)
    return principal


def _remembered(request: web.Request, services: Services) -> Principal | None:
    """An API-key caller admitted before with this header from this address, admitted again."""
    if request.query_string:
        return None
    headers = request.headers.getall("Authorization", ())
    if len(headers) != 1:
        return None
    principal, quota = request.app[ADMISSIONS].admitted(request, services, headers[0])
    return None if principal is None else _admit(request, services, principal, quota)


def _admit(request: web.Request, services: Services, principal: Principal, quota: str) -> Principal:
    """The caller, authenticated: noted (log, audit), its route allowed, its quota counted."""
    request_context.note_caller(principal)
    _check_route(request, principal)
    services.quotas.check(quota)
    return principal


def _with_source_ip(request: web.Request, services: Services, principal: Principal) -> Principal:
    """The caller with the address its request came from (for ``source_ip: caller`` policies)."""
    trusted = services.settings.listen.trusted_proxies
    forwarded = request.headers.getall("X-Forwarded-For", []) if trusted else []
    address = client_address(request.remote, forwarded, trusted)
    if principal.source_ip == address:
        return principal
    if principal.auth_method == "jwt":  # a JWT caller is a new object per request
        return dataclasses.replace(principal, source_ip=address)
    key = (id(principal), address)
    found = _ADDRESSED.get(key)
    if found is not None and found[0] is principal:
        return found[1]
    addressed = dataclasses.replace(principal, source_ip=address)
    if len(_ADDRESSED) >= _MAX_ADDRESSED:
        _ADDRESSED.clear()
    _ADDRESSED[key] = (principal, addressed)
    return addressed


_ADDRESSED: dict[tuple[int, str | None], tuple[Principal, Principal]] = {}
"""Memo of ``_with_source_ip``: an API-key or mTLS caller is one object, seen from few
addresses (JWT callers are not kept: each request verifies a new one, token and all).

Keyed by the caller object's id and holding the object (``is`` guards a reused id).
"""
_MAX_ADDRESSED = 4096


def _query(request: web.Request) -> MultiMapping[str]:
    """The request's query, without parsing one the URL does not have."""
    return request.query if request.query_string else _NO_QUERY


_NO_QUERY: MultiMapping[str] = MultiDictProxy(MultiDict())


def _check_route(request: web.Request, principal: Principal) -> None:
    """A restricted API key may call only the routes its ``allow.routes`` lists."""
    if not may_use_route(principal, request.match_info.route.name or ""):
        listed = getattr(principal.allow, "routes", None) or ()  # refused: it has a list
        allowed = ", ".join(_ROUTE_TITLES[name] for name in sorted(listed))
        raise AccessDenied(f"this API key may only be used for {allowed}")


def may_use_route(principal: Principal, route: str) -> bool:
    """Whether ``principal`` may call ``route`` (an API key's ``allow.routes``, if it has one)."""
    allow = principal.allow
    return allow is None or allow.routes is None or route in allow.routes


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise RequestInvalid("the JSON body repeats a field")
    return dict(pairs)


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicate_keys)
"""Built once: ``json.loads`` with a hook builds a new decoder per call."""


async def _parse(request: web.Request, model: type[_Body]) -> _Body:
    try:
        raw = await request.read()  # bounded by client_max_size: 413 past it
    except RequestPayloadError as err:
        raise RequestInvalid("the body could not be read (bad Content-Encoding?)") from err
    data = _fast_decode(raw)
    if data is None:
        try:
            data = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
        except (ValueError, UnicodeDecodeError, RecursionError) as err:
            raise RequestInvalid("the body must be a JSON object") from err
    if not isinstance(data, dict):
        raise RequestInvalid("the body must be a JSON object")
    try:
        return model.model_validate(data)
    except pydantic.ValidationError as err:
        raise RequestInvalid(_describe_validation(err)) from err


def _fast_decode(raw: bytes) -> dict[str, Any] | None:
    """What ``_DECODER`` reads from ``raw``, when orjson can tell cheaply; else None.

    Only for a UTF-8 object of strings, ints, booleans, nulls and objects of
    those (what bodies hold) that orjson reads: anything else (floats, which
    orjson may read from big ints, lists, deeper nesting, other encodings,
    NaN...) is left to ``_DECODER``, which gives the same result or the same
    error as before.  Repeated fields: each pair in the text has one ``:``
    of its own, so if the objects read hold as many fields as ``raw`` has
    colons, none was repeated (a colon in a string only makes the count
    differ, and ``_DECODER`` then decides).
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict:
        return None
    fields = len(data)
    for value in data.values():
        kind = type(value)
        if kind is dict:
            fields += len(value)
            for member in value.values():
                if type(member) not in _SCALARS:
                    return None
        elif kind not in _SCALARS:
            return None
    return data if fields == raw.count(b":") else None


_SCALARS = frozenset({str, int, bool, type(None)})


def _describe_validation(err: pydantic.ValidationError) -> str:
    problems = []
    for item in err.errors(include_url=False, include_input=False)[:5]:
        where = ".".join(str(part) for part in item["loc"]) or "body"
        problems.append(f"{where}: {item['msg']}")
    return "; ".join(problems)


async def get_credentials(request: web.Request) -> web.Response:
    """``GET /v1/credentials/{policy}``: scoped STS credentials for this caller."""
    services = request.app[SERVICES]
    name = request.match_info["policy"]
    principal = _remembered(request, services)  # a cache hit of a known caller: no await
    issued = vending.cached_credentials(services, principal, name) if principal else None
    if issued is None:
        principal = principal or await _authenticated(request, services)
        query = _query(request)
        issued = await vending.issue_credentials(
            services,
            principal,
            name,
            query.getall("min_ttl_seconds", []),
            {n: query.getall(n, []) for n in vending.NARROWING_PARAMETERS} if query else {},
        )
    replies = request.app[REPLIES]
    body = replies.body(
        issued.credentials,
        issued.scope,
        issued.endpoint,
        issued.expires_in,
        request[REQUEST_ID],
        issued.issued_at,
    )
    return _json(body, no_store=True)


async def create_presigned_url(request: web.Request) -> web.Response:
    """``POST /v1/presign``: a V4 presigned URL for one operation on one key."""
    services = request.app[SERVICES]
    principal = await _authenticate(request, services)
    body = await _parse(request, PresignBody)
    signed = await vending.presign_url(services, principal, body)
    expiry = signed.expiry
    reply = {
        "url": signed.url,
        "method": signed.method,
        "expiration": format_sts_time(signed.expiration),
        "expires_in": expiry.seconds,
        "signed_headers": signed.signed_headers,
        "clamped": expiry.clamped,
        "requested_expires_seconds": expiry.requested_seconds,
    }
    return _json(reply, no_store=True)


async def create_post_policy(request: web.Request) -> web.Response:
    """``POST /v1/post-policy``: signed PostObject form fields for a browser upload."""
    services = request.app[SERVICES]
    principal = await _authenticate(request, services)
    body = await _parse(request, PostPolicyBody)
    signed = await vending.sign_post_policy(services, principal, body)
    expiry = signed.expiry
    reply = {
        "host": signed.host,
        "fields": signed.fields,
        "expiration": format_sts_time(signed.expiration),
        "expires_in": expiry.seconds,
        "clamped": expiry.clamped,
        "requested_expires_seconds": expiry.requested_seconds,
    }
    return _json(reply, no_store=True)


async def list_policies(request: web.Request) -> web.Response:
    """``GET /v1/policies``: the policies this caller may use, with its rendered prefixes."""
    services = request.app[SERVICES]
    principal = await _authenticate(request, services)
    usable = usable_scopes(services.policies, principal)
    return _json({"policies": [_describe(services, scope) for scope in usable]})


def _describe(services: Services, scope: Scope) -> dict[str, Any]:
    """A usable policy: the primary grant's fields at the top (as before), and ``grants``."""
    policy = scope.policy
    endpoint = oss_endpoint(services.settings.oss, policy)
    return {
        "name": policy.name,
        "description": policy.description,
        "bucket": policy.bucket,
        "region": policy.region,
        "endpoint": endpoint.url,
        "address_style": endpoint.address_style,
        "prefix": scope.prefix,
        "actions": list(policy.actions),
        "duration_seconds": policy.duration_seconds,
        "max_url_expires_seconds": policy.max_url_expires_seconds,
        "content_types": list(policy.content_types),
        "max_object_bytes": policy.max_object_bytes,
        "multipart_part_bytes": policy.multipart_part_bytes,
        "forbid_overwrite": policy.forbid_overwrite,
        "grants": [_grant_description(grant) for grant in scope.grants],
    }


def _grant_description(grant: RamGrant) -> dict[str, Any]:
    """One grant as ``GET /v1/policies`` lists it: always the same four fields."""
    return {
        "bucket": grant.bucket,
        "prefix": grant.prefix,
        "key": grant.key,
        "actions": list(grant.actions),
    }


async def healthz(request: web.Request) -> web.Response:
    """``GET /healthz``: the process is alive."""
    return _json({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """``GET /readyz``: policies loaded, source credentials available, not shutting down.

    STS's own state is reported (``sts``), never required: an STS outage hits
    every replica alike, and a ready one still serves its cached credentials
    and answers the rest with 503 + Retry-After (docs/api.md).
    """
    services = request.app[SERVICES]
    checks = {
        "policies_loaded": len(services.policies) > 0,
        "source_credentials": await services.sts.check_source_credentials(),
        "accepting_requests": not services.shutting_down,
    }
    ready = all(checks.values())
    health = services.sts.health
    sts = {
        "state": health.state,
        "consecutive_failures": health.consecutive_failures,
        "cached_credentials": len(services.cache),
    }
    return _json(
        {"status": "ready" if ready else "not_ready", "checks": checks, "sts": sts},
        200 if ready else 503,
    )


async def metrics(request: web.Request) -> web.Response:
    """``GET /metrics``: Prometheus text format."""
    body = request.app[SERVICES].metrics.render()
    return web.Response(body=body, headers={"Content-Type": METRICS_CONTENT_TYPE})


async def openapi(request: web.Request) -> web.Response:
    """``GET /openapi.json``: the OpenAPI 3.1 description of this API."""
    return _json(openapi_document())
