"""The hot path's cache key is the key of the request STS would get, for every kind of policy."""

from __future__ import annotations

from pathlib import Path

import pytest

from broker import credential_requests
from broker.credential_requests import assume_request, cache_key
from broker.credentials.cache import CacheKey
from broker.errors import AccessDenied, AuthenticationFailed
from broker.models import OidcToken, Principal
from broker.policies import load_policies
from broker.scopes import Narrowing, narrow
from tests.conftest import POLICIES_DIR

NOW = 1_800_000_000.0
ALICE = Principal("alice", ("browser",))
SVC_A = Principal("svc-a", ("internal",), source_ip="127.0.0.1")
FEDERATED = """
name: my-files
role_arn: acs:ram::1234567890123456:role/oss-avatar-upload
bucket: examplebucket
region: cn-hangzhou
prefix: "users/${subject}/"
actions: [put, get]
duration_seconds: 900
max_url_expires_seconds: 600
callers: ["group:browser"]
federation: oidc
oidc_provider_arn: acs:ram::1234567890123456:oidc-provider/idp
"""


@pytest.mark.parametrize("principal", [ALICE, SVC_A])
def test_every_shipped_policys_key_is_its_requests_key(principal: Principal) -> None:
    """For each shipped policy the caller may use, the key equals the full request's key."""
    policies = load_policies(POLICIES_DIR)
    scopes = [scope for p in policies if (scope := policies.scope(p.name, principal)) is not None]
    assert scopes
    for scope in scopes:
        key = cache_key(principal, scope, NOW, refresh_margin=60)
        request = assume_request(principal, scope, key)
        assert request.policy == scope.document
        assert CacheKey.for_request(request) == key


def test_a_federated_key_names_the_user_and_carries_their_token(tmp_path: Path) -> None:
    """federation: oidc keys name provider, issuer and subject; the request carries the token."""
    (tmp_path / "my-files.yaml").write_text(FEDERATED)
    policies = load_policies(tmp_path)
    token = OidcToken("eyJ.token.sig", "https://idp.example.com", NOW + 3600)
    user = Principal("alice", ("browser",), auth_method="jwt", oidc_token=token)
    scope = policies.scope("my-files", user)
    assert scope is not None
    key = cache_key(user, scope, NOW, refresh_margin=60)
    request = assume_request(user, scope, key)
    assert key.federation == (
        "oidc acs:ram::1234567890123456:oidc-provider/idp https://idp.example.com alice"
    )
    assert request.oidc_token is token
    assert CacheKey.for_request(request) == key
    with pytest.raises(AuthenticationFailed):
        cache_key(user, scope, NOW + 3550, refresh_margin=60)  # the JWT expires too soon
    api_key_caller = Principal("alice", ("browser",))
    with pytest.raises(AccessDenied):
        cache_key(api_key_caller, scope, NOW, refresh_margin=60)


def test_a_narrowed_scope_has_its_own_key_and_is_not_kept() -> None:
    """Narrowing changes the key (its digest), matches its request, and leaves no memo entry."""
    policies = load_policies(POLICIES_DIR)
    scope = policies.scope("avatar-upload", ALICE)
    assert scope is not None
    narrowed = narrow(scope, Narrowing(prefix="avatars/alice/2026/"))
    kept_before = len(credential_requests._KEYS)
    key = cache_key(ALICE, narrowed, NOW, refresh_margin=60)
    assert key != cache_key(ALICE, scope, NOW, refresh_margin=60)
    assert CacheKey.for_request(assume_request(ALICE, narrowed, key)) == key
    assert len(credential_requests._KEYS) <= kept_before + 1  # the whole scope's, at most
