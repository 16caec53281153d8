"""The signing memos: a caller's scope and a URL's plan, kept only while they hold."""

from __future__ import annotations

import dataclasses
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from broker import presign_targets, signing, vending
from broker.credential_requests import cache_key
from broker.errors import AccessDenied, RequestInvalid
from broker.models import OidcToken, Principal
from broker.policies import load_policies
from broker.services import Services
from broker.uploads import PresignBody
from tests.conftest import (
    POLICIES_DIR,
    FakeClock,
)

ALICE = Principal("alice", ("browser",))
AVATAR: dict[str, Any] = {
    "policy": "avatar-upload",
    "key": "avatars/alice/me.png",
    "content_type": "image/png",
    "content_length": 1024,
}


def _kept_scopes(principal: Principal) -> int:
    return sum(1 for known in presign_targets._SCOPES.values() if known.principal is principal)


def test_a_scope_is_kept_for_the_same_caller_object_and_configuration(services: Services) -> None:
    """The second resolution is the kept scope; a reload's new policy set resolves afresh."""
    first = presign_targets.signing_scope(services, ALICE, "avatar-upload")
    assert presign_targets.signing_scope(services, ALICE, "avatar-upload") is first
    services.policies = load_policies(POLICIES_DIR)  # what a reload does
    again = presign_targets.signing_scope(services, ALICE, "avatar-upload")
    assert again is not first
    assert again == first
    services.settings = services.settings.model_copy()  # a settings reload
    presign_targets.signing_scope(services, ALICE, "avatar-upload")
    kept = presign_targets._SCOPES[(id(ALICE), "avatar-upload")]
    assert kept.settings is services.settings


def test_a_reload_that_drops_the_policy_refuses_the_next_request(
    services: Services, tmp_path: Path
) -> None:
    """Once a reload removes a policy, its kept scope is never used again: 403."""
    presign_targets.signing_scope(services, ALICE, "avatar-upload")
    shutil.copy(POLICIES_DIR / "reports-read.yaml", tmp_path)
    services.policies = load_policies(tmp_path)  # avatar-upload is gone
    with pytest.raises(AccessDenied):
        presign_targets.signing_scope(services, ALICE, "avatar-upload")


def test_refusals_are_never_kept(services: Services) -> None:
    """A policy the caller may not use is refused each time, and leaves no memo entry."""
    nobody = Principal("nobody", ())
    for _ in range(2):
        with pytest.raises(AccessDenied):
            presign_targets.signing_scope(services, nobody, "avatar-upload")
    assert _kept_scopes(nobody) == 0


def test_jwt_callers_are_not_kept(services: Services) -> None:
    """A JWT caller (a new object each request, token and all) leaves no memo entry."""
    token = OidcToken("eyJ.token.sig", "https://idp.example.com", 2e9)
    user = Principal("alice", ("browser",), auth_method="jwt", oidc_token=token)
    presign_targets.signing_scope(services, user, "avatar-upload")
    assert _kept_scopes(user) == 0


def test_a_copy_of_a_caller_is_resolved_on_its_own(services: Services) -> None:
    """The memo holds the caller object: an equal but different object is resolved anew."""
    presign_targets.signing_scope(services, ALICE, "avatar-upload")
    copy = dataclasses.replace(ALICE)
    presign_targets.signing_scope(services, copy, "avatar-upload")
    assert _kept_scopes(copy) == 1


def test_the_scope_memo_is_bounded(services: Services) -> None:
    """However many callers sign, at most MAX_SCOPES scopes are kept."""
    for n in range(presign_targets.MAX_SCOPES + 10):
        presign_targets.signing_scope(services, Principal(f"u{n}", ("browser",)), "avatar-upload")
    assert len(presign_targets._SCOPES) <= presign_targets.MAX_SCOPES


# --- URL plans -------------------------------------------------------------------


def _plan(services: Services, body: PresignBody, builds: list[int]) -> signing.PresignPlan:
    scope = presign_targets.signing_scope(services, ALICE, body.policy)
    endpoint = signing.OssEndpoint("oss-cn-hangzhou.aliyuncs.com")

    def build() -> signing.PresignInput:
        builds.append(1)
        return signing.PresignInput("PUT", "examplebucket", body.key, "cn-hangzhou", endpoint, 0)

    return presign_targets.url_plan(scope, endpoint, "examplebucket", body, build)


def test_a_plan_is_kept_per_shape_whatever_the_key_and_lifetime(services: Services) -> None:
    """Two bodies differing in key and expires_seconds share a plan; another shape does not."""
    builds: list[int] = []
    first = _plan(services, PresignBody.model_validate(AVATAR), builds)
    other = {**AVATAR, "key": "avatars/alice/other.png", "expires_seconds": 60}
    assert _plan(services, PresignBody.model_validate(other), builds) is first
    assert len(builds) == 1
    _plan(services, PresignBody.model_validate({**AVATAR, "content_length": 5}), builds)
    assert len(builds) == 2


def test_bodies_with_headers_or_metadata_are_planned_every_time(services: Services) -> None:
    """headers and metadata (dicts) are no memo key: such a body is built and checked anew."""
    builds: list[int] = []
    body = PresignBody.model_validate({**AVATAR, "metadata": {"a": "b"}})
    _plan(services, body, builds)
    _plan(services, body, builds)
    assert len(builds) == 2


def test_the_plan_memo_is_bounded(services: Services) -> None:
    """However many shapes are signed, at most MAX_PLANS plans are kept."""
    builds: list[int] = []
    for n in range(presign_targets.MAX_PLANS + 10):
        _plan(services, PresignBody.model_validate({**AVATAR, "content_length": n}), builds)
    assert len(presign_targets._PLANS) <= presign_targets.MAX_PLANS


async def test_a_refused_shape_is_refused_again_after_a_kept_one(services: Services) -> None:
    """A shape that fails a check is never kept: the same refusal, request after request."""
    await vending.presign_url(services, ALICE, PresignBody.model_validate(AVATAR))
    too_big = PresignBody.model_validate({**AVATAR, "content_length": 10**9})
    bad_type = PresignBody.model_validate({**AVATAR, "content_type": "text/html"})
    for _ in range(2):
        with pytest.raises(AccessDenied, match="exceeds policy avatar-upload's limit"):
            await vending.presign_url(services, ALICE, too_big)
        with pytest.raises(AccessDenied, match="content_type must be one of"):
            await vending.presign_url(services, ALICE, bad_type)


async def test_a_kept_plan_still_checks_every_key(services: Services) -> None:
    """With the shape's plan kept, a key outside the prefix or malformed is still refused."""
    await vending.presign_url(services, ALICE, PresignBody.model_validate(AVATAR))
    outside = PresignBody.model_validate({**AVATAR, "key": "avatars/bob/me.png"})
    with pytest.raises(AccessDenied, match="outside this caller's prefix"):
        await vending.presign_url(services, ALICE, outside)
    dotted = PresignBody.model_validate({**AVATAR, "key": "avatars/alice/../bob/me.png"})
    with pytest.raises(RequestInvalid, match=r"'\.' or '\.\.' segments"):
        await vending.presign_url(services, ALICE, dotted)
    prefix = PresignBody.model_validate({**AVATAR, "key": "avatars/alice/"})
    with pytest.raises(AccessDenied):
        await vending.presign_url(services, ALICE, prefix)


async def test_urls_from_a_kept_plan_equal_unplanned_urls(
    services: Services, clock: FakeClock
) -> None:
    """Each key signed with a kept plan is the URL presign() signs for it from scratch."""
    for name in ("me.png", "a b+c.png", "照片.png"):
        body = PresignBody.model_validate({**AVATAR, "key": f"avatars/alice/{name}"})
        signed = await vending.presign_url(services, ALICE, body)
        scope = presign_targets.signing_scope(services, ALICE, "avatar-upload")
        margin = services.settings.cache.refresh_margin_seconds
        token = services.cache.fresh(
            cache_key(ALICE, scope, clock(), refresh_margin=margin), 0, clock()
        )
        assert token is not None
        request = signing.PresignInput(
            "PUT",
            "examplebucket",
            body.key,
            "cn-hangzhou",
            signing.OssEndpoint("oss-cn-hangzhou.aliyuncs.com"),
            signed.expiry.seconds,
            headers={"Content-Type": "image/png", "Content-Length": "1024"},
            additional_headers=("content-length",),
        )
        when = signed.expiration - timedelta(seconds=signed.expiry.seconds)
        assert signed.url == signing.presign(token.credentials, request, when).url


def test_a_callback_is_part_of_the_shape(services: Services) -> None:
    """Bodies with the same callback share a plan; another callback URL or body is planned anew."""
    builds: list[int] = []
    callback = {"url": "https://cb.example/", "body": "a=b"}
    for key in ("avatars/alice/1.png", "avatars/alice/2.png"):
        body = {**AVATAR, "key": key, "callback": callback}
        _plan(services, PresignBody.model_validate(body), builds)
    assert len(builds) == 1
    for changed in ({**callback, "url": "https://evil.example/"}, {**callback, "body": "c=d"}):
        _plan(services, PresignBody.model_validate({**AVATAR, "callback": changed}), builds)
    assert len(builds) == 3
