"""Which policies a caller may use, and its scope of each: the first step of every use case.

A policy a caller may not use (or that does not exist) is one 403 whichever
it is; a restricted API key (``allow.policies``) is told which it may use.
"""

from __future__ import annotations

from broker import request_context
from broker.errors import AccessDenied, RequestInvalid, TemplateValueRejected
from broker.models import Principal
from broker.names import POLICY_NAME, POLICY_NAME_RULE
from broker.policies import PolicySet, Scope

__all__ = ["usable_scope", "usable_scopes"]


def usable_scope(policies: PolicySet, principal: Principal, name: str) -> Scope:
    """The caller's scope of policy ``name``: the same 403 whether or not the policy exists.

    A restricted API key naming a policy outside its ``allow.policies`` gets a
    403 saying so (the list is the key's own configuration, not a secret).
    """
    if not POLICY_NAME.fullmatch(name):
        raise RequestInvalid(POLICY_NAME_RULE)
    request_context.note_policy(name)
    allow = principal.allow
    if allow is not None and allow.policies is not None and name not in allow.policies:
        names = ", ".join(sorted(allow.policies))
        raise AccessDenied(f"this API key may only be used for the policies: {names}")
    scope = policies.scope(name, principal)
    if scope is None:
        raise AccessDenied(policy=name)
    return scope


def usable_scopes(policies: PolicySet, principal: Principal) -> list[Scope]:
    """Every policy this caller may use, rendered.

    Left out: those its identity cannot render, and those bound to the
    caller's address when the request's address is unknown.
    """
    usable = []
    for policy in policies:
        if principal.allow is not None and not principal.allow.allows_policy(policy.name):
            continue
        try:
            scope = policies.scope(policy.name, principal)
        except (TemplateValueRejected, RequestInvalid):
            continue
        if scope is not None:
            usable.append(scope)
    return usable
