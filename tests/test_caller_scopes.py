"""Which policies a caller may use, rendered (broker/caller_scopes.py)."""

from __future__ import annotations

import pytest

from broker.caller_scopes import usable_scope, usable_scopes
from broker.errors import AccessDenied, RequestInvalid
from broker.models import Allowance, Principal
from broker.policies import load_policies
from tests.conftest import POLICIES_DIR

ALICE = Principal("alice", ("browser",))
SVC_A = Principal("svc-a", ("internal",))
POLICIES = load_policies(POLICIES_DIR)


def test_usable_scopes_are_the_callers_policies_rendered() -> None:
    """Each caller sees the policies it may use, with its own prefix."""
    alice = {scope.policy.name: scope.prefix for scope in usable_scopes(POLICIES, ALICE)}
    svc_a = {scope.policy.name: scope.prefix for scope in usable_scopes(POLICIES, SVC_A)}
    assert alice == {"avatar-upload": "avatars/alice/", "quick-upload": "uploads/alice/"}
    assert svc_a == {  # pinned-reads binds tokens to an address, and SVC_A has none
        "report-jobs": "reports/",
        "reports-read": "reports/",
        "service-uploads": "services/svc-a/",
        "vpc-ingest": "ingest/svc-a/",
    }


def test_a_policy_outside_a_restricted_key_is_refused_naming_what_it_may_use() -> None:
    """A key limited by allow.policies gets 403 listing its policies; an unknown name is 403 too."""
    limited = Principal(
        "svc-a", ("internal",), allow=Allowance(routes=None, policies=frozenset({"report-jobs"}))
    )
    assert usable_scope(POLICIES, limited, "report-jobs").policy.name == "report-jobs"
    with pytest.raises(AccessDenied, match="report-jobs"):
        usable_scope(POLICIES, limited, "service-uploads")
    with pytest.raises(AccessDenied):
        usable_scope(POLICIES, SVC_A, "no-such-policy")
    with pytest.raises(RequestInvalid):
        usable_scope(POLICIES, SVC_A, "../etc")
