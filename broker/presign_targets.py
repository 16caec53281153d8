"""Presign and post-policy requests resolved before: the caller's scope, and a URL's plan.

Two bounded memos, holding no secret, for ``broker.vending``'s signing use cases:

* ``signing_scope``: the scope of a policy for a caller, kept per caller
  object and policy name while the policy set and settings are the very
  objects it was resolved under (both are swapped whole on reload), as
  ``broker.credential_requests.known_target`` does for credentials.  Not for
  JWT callers (a new object per request) nor ``federation: oidc`` policies.
* ``url_plan``: what a presigned URL signs besides its key, token and time
  (``broker.signing.presign_plan``), kept per scope, endpoint, bucket and
  request shape (the body's fields but ``key`` and ``expires_seconds``).  Only
  a shape whose every check passed is kept, so a request that reuses a plan
  would have passed the same checks; the key is checked on every request.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

from broker import request_context, signing
from broker.caller_scopes import usable_scope
from broker.models import Principal
from broker.policies import Policy, PolicySet, Scope
from broker.services import Services
from broker.signing import OssEndpoint
from broker.uploads import (
    ADDITIONAL_HEADERS,
    OPERATIONS,
    PresignBody,
    presign_headers,
    presign_query,
)

__all__ = ["MAX_PLANS", "MAX_SCOPES", "presign_input", "signing_scope", "url_plan"]

MAX_SCOPES = 4096
MAX_PLANS = 4096


@dataclass(frozen=True, slots=True)
class _KnownScope:
    principal: Principal
    policies: PolicySet
    settings: object
    scope: Scope


_SCOPES: dict[tuple[int, str], _KnownScope] = {}


def signing_scope(services: Services, principal: Principal, name: str) -> Scope:
    """``usable_scope`` of policy ``name`` for ``principal``, from the memo when it holds."""
    found = _SCOPES.get((id(principal), name))
    if (
        found is not None
        and found.principal is principal
        and found.policies is services.policies
        and found.settings is services.settings
    ):
        request_context.note_policy(name)  # as usable_scope would
        return found.scope
    policies, settings = services.policies, services.settings
    scope = usable_scope(policies, principal, name)
    if principal.auth_method != "jwt" and scope.policy.federation != "oidc":
        if len(_SCOPES) >= MAX_SCOPES:
            _SCOPES.clear()
        _SCOPES[(id(principal), name)] = _KnownScope(principal, policies, settings, scope)
    return scope


_SHAPE = attrgetter(
    "bucket",
    "method",
    "operation",
    "content_type",
    "content_md5",
    "content_length",
    "storage_class",
    "callback",
    "upload_id",
    "part_number",
    "response_content_disposition",
    "response_content_type",
    "response_cache_control",
)
"""The fields of a ``PresignBody`` a plan depends on, but ``headers`` and ``metadata`` (dicts)."""

_PLANS: dict[tuple[Any, ...], tuple[Scope, signing.PresignPlan]] = {}


def url_plan(
    scope: Scope,
    endpoint: OssEndpoint,
    bucket: str,
    body: PresignBody,
    build: Callable[[], signing.PresignInput],
) -> signing.PresignPlan:
    """The plan of ``build()`` (which checks the body), kept for this scope and body shape.

    ``build`` runs, and may refuse the request, whenever no plan is kept; a
    body with ``headers`` or ``metadata`` is planned afresh every time.
    """
    if body.headers or body.metadata:
        return signing.presign_plan(build())
    key = (id(scope), endpoint, bucket, _SHAPE(body))
    found = _PLANS.get(key)
    if found is not None and found[0] is scope:
        return found[1]
    plan = signing.presign_plan(build())
    if len(_PLANS) >= MAX_PLANS:
        _PLANS.clear()
    _PLANS[key] = (scope, plan)
    return plan


def presign_input(
    endpoint: OssEndpoint, policy: Policy, body: PresignBody, operation: str, bucket: str, key: str
) -> signing.PresignInput:
    """What to sign, every header and query checked; its lifetime is set once a token signs."""
    return signing.PresignInput(
        method=OPERATIONS[operation].method,
        bucket=bucket,
        key=key,
        region=policy.region,
        endpoint=endpoint,
        expires_seconds=0,
        headers=presign_headers(body, policy, operation),
        query=presign_query(body, policy, operation),
        additional_headers=ADDITIONAL_HEADERS,
    )
