"""Audit lines: the fast issuance renderer writes the former renderer's bytes, scrub included."""

from __future__ import annotations

import dataclasses
import gc
import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from broker import audit_render
from broker.audit_render import IssuanceRenderer, render_line, who
from broker.logs import REDACTED, scrub_named
from broker.models import Credentials, Principal
from broker.policies import load_policies
from broker.ram import RamGrant
from broker.request_context import RequestContext
from broker.scopes import Scope
from tests.conftest import POLICIES_DIR

NOW = "2023-11-14T22:13:20.250Z"
CANARY = "access_token=canary-audit-7f3e"

# --- the renderer as it was before issue 14 (broker/audit.py), verbatim: the reference ---


def reference_who(context: Any, kind: str, event: str, now: str) -> dict[str, Any]:
    principal = context.principal
    return {
        "time": now,
        "type": kind,
        "event": event,
        "request_id": context.request_id,
        "route": context.route,
        "client_address": context.client_address,
        "caller": principal.subject if principal is not None else None,
        "auth_method": principal.auth_method if principal is not None else None,
        "policy": context.policy,
    }


def reference_grant(grant: RamGrant) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "bucket": grant.bucket,
        "prefix": grant.prefix,
        "actions": list(grant.actions),
    }
    if grant.key is not None:
        fields["key"] = grant.key
    return fields


def reference_issuance(
    context: Any, event: str, principal: Principal, scope: Scope, now: str
) -> dict[str, Any]:
    policy, primary = scope.policy, scope.grants[0]
    record = reference_who(context, "issuance", event, now)
    record.update(
        caller=principal.subject,
        auth_method=principal.auth_method,
        policy=policy.name,
        role_arn=policy.role_arn,
        federation=policy.federation,
        region=policy.region,
        **reference_grant(primary),
        narrowed=scope.narrowed,
        policy_digest=scope.digest,
    )
    if len(scope.grants) > 1:
        record["grants"] = [reference_grant(grant) for grant in scope.grants]
    return record


def reference_line(record: dict[str, Any]) -> bytes:
    text = orjson.dumps(record).decode()
    values = "\n".join([value for value in record.values() if type(value) is str])
    if scrub_named(values) != values:
        text = scrub_named(text)
    return (text + "\n").encode()


def reference_issued(
    context: Any,
    event: str,
    now: str,
    principal: Principal,
    scope: Scope,
    token: Credentials,
    tail: tuple[str, int, str],
    detail: dict[str, object],
) -> bytes:
    """The line the former ``Auditor.issued`` wrote for these arguments."""
    expiration, expires_in, cache = tail
    record = reference_issuance(context, event, principal, scope, now)
    record.update(detail)
    record.update(
        access_key_id=token.access_key_id,
        expiration=expiration,
        expires_in=expires_in,
        cache=cache,
        sts_request_id=token.sts_request_id,
    )
    return reference_line(record)


# --- the records ---

_POLICIES = load_policies(POLICIES_DIR)
SERVICE = Principal("svc-a", ("internal",))
ALICE = Principal("alice", ("browser",), auth_method="jwt")


def _scope(name: str, principal: Principal) -> Scope:
    scope = _POLICIES.scope(name, principal)
    assert scope is not None
    return scope


def _token(sts_request_id: str | None = "6894B13B-6D71-4EF5-88FA-F32781734A7F") -> Credentials:
    return Credentials(
        access_key_id="STS.NUxb3test0000000000000",
        access_key_secret="canary-secret-never-audited",
        security_token="CAIS" + "t" * 100,
        expiration=datetime(2026, 11, 21, 5, 0, tzinfo=UTC),
        sts_request_id=sts_request_id,
    )


def _cases() -> dict[str, tuple[Any, ...]]:
    """name → ``IssuanceRenderer.line`` arguments; every shape a record takes."""
    service, avatar = _scope("service-uploads", SERVICE), _scope("avatar-upload", ALICE)
    multi = _scope("report-jobs", SERVICE)
    key_bound = RamGrant(avatar.bucket, avatar.prefix, ("put",), key="avatars/alice/me.png")
    narrowed = dataclasses.replace(service, grants=(key_bound,), narrowed=True)
    oidc = dataclasses.replace(
        avatar, policy=avatar.policy.model_copy(update={"federation": "oidc"})
    )
    keyed_multi = dataclasses.replace(multi, grants=(key_bound, *multi.grants))
    post = {"clamped": True, "key_prefix": "avatars/alice/"}
    secret_grant = RamGrant("examplebucket", f"{CANARY}/", ("get",))
    context = RequestContext("5f0c3b8e-6a55-4b1c", "credentials", "10.1.2.3", None, "x")
    presign = RequestContext("req-presign-1", "presign", "::1")
    url = {"clamped": False, "operation": "PutObject", "key": "avatars/alice/é ☃.png"}

    def hit(**changes: Any) -> tuple[Any, ...]:
        """A cached credentials reply's arguments, with ``changes``."""
        args = {
            "context": context,
            "event": "credentials_issued",
            "now": NOW,
            "principal": SERVICE,
            "scope": service,
            "token": _token(),
            "tail": (_token().expiration_iso(), 3000, "hit"),
            "detail": {},
        }
        return tuple({**args, **changes}.values())

    def signed(**changes: Any) -> tuple[Any, ...]:
        """A presigned URL's arguments, with ``changes``."""
        base = {"context": presign, "event": "url_presigned", "principal": ALICE, "scope": avatar}
        tail = ("2026-11-21T04:10:00Z", 600, "miss")
        return hit(**{**base, "tail": tail, "detail": url, **changes})

    def request(**changes: Any) -> RequestContext:
        return dataclasses.replace(context, **changes)

    return {
        "hit": hit(),
        "miss": hit(tail=(_token().expiration_iso(), 3600, "miss")),
        "narrowed, key-bound": hit(scope=narrowed),
        "several grants": hit(scope=multi),
        "several, key-bound first": hit(scope=keyed_multi),
        "jwt caller, oidc": hit(principal=ALICE, scope=oidc),
        "no sts request id": hit(token=_token(None)),
        "no request context": hit(context=RequestContext()),
        "presigned url": signed(),
        "presign, key-bound grant": signed(principal=SERVICE, scope=narrowed),
        "post policy": signed(event="post_policy_signed", detail=post),
        "detail reusing a name": signed(detail={"cache": "x", "time": 1}),
        "secret in the request id": hit(context=request(request_id=CANARY)),
        "secret in the address": hit(context=request(client_address=f"1.2.3.4 {CANARY}")),
        "secret in the route": hit(context=request(route=CANARY)),
        "secret in the caller": hit(principal=Principal(CANARY)),
        "secret in the prefix": hit(scope=dataclasses.replace(service, grants=(secret_grant,))),
        "secret in the expiration": hit(tail=(CANARY, 5, "hit")),
        "secret in the token's request id": hit(token=_token(CANARY)),
        "secret in the detail": signed(detail={"operation": "GetObject", "key": f"a/{CANARY}"}),
        "secret across two values": hit(context=request(request_id="x password", route=": pw")),
        "a trigger word, no secret": hit(context=request(request_id="token-bucket-7")),
    }  # fmt: skip


CASES = _cases()


@pytest.mark.parametrize("name", list(CASES))
def test_each_record_has_the_former_renderers_bytes(name: str) -> None:
    """Every record shape (hit, miss, narrowed, grants, keys, detail, secrets) renders as before."""
    args = CASES[name]
    assert IssuanceRenderer().line(*args) == reference_issued(*args)


def test_records_keep_their_bytes_from_a_shared_memo_in_any_order() -> None:
    """One renderer, every case thrice in turn: the memo never lends one record another's fields."""
    renderer = IssuanceRenderer()
    for _ in range(3):
        for args in (*CASES.values(), *reversed(CASES.values())):
            assert renderer.line(*args) == reference_issued(*args)


@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("secret in")])
def test_a_named_secret_in_any_value_is_scrubbed_as_before(name: str) -> None:
    """A value holding ``access_token=...`` is masked in the line, as the former renderer did."""
    line = IssuanceRenderer().line(*CASES[name])
    assert b"canary-audit-7f3e" not in line
    assert REDACTED.encode() in line
    json.loads(line)


def test_refusal_records_render_as_before() -> None:
    """A refusal record (who + status, code, reason with a secret) has the former bytes."""
    context = RequestContext("req-refused-1", "credentials", "127.0.0.1", ALICE, "avatar-upload")
    for kind_context in (context, RequestContext()):
        record = who(kind_context, "refusal", "request_refused", NOW)
        record.update(status=403, error_code="AccessDenied", reason=f"denied for {CANARY}")
        expected = reference_who(kind_context, "refusal", "request_refused", NOW)
        expected.update(status=403, error_code="AccessDenied", reason=f"denied for {CANARY}")
        assert render_line(record) == reference_line(expected)


def test_a_scope_made_after_another_was_dropped_gets_its_own_fields() -> None:
    """The memo holds each scope it keys by id(): a new scope never takes a dropped one's middle."""
    renderer = IssuanceRenderer()
    context, event, now, principal, scope, token, tail, detail = CASES["hit"]
    for index in range(50):
        fresh = dataclasses.replace(scope, grants=(RamGrant("b", f"p{index}/", ("get",)),))
        args = (context, event, now, principal, fresh, token, tail, detail)
        assert renderer.line(*args) == reference_issued(*args)
        del fresh, args
        gc.collect()


def test_the_memo_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past its bound the memo starts afresh (and records keep their bytes)."""
    monkeypatch.setattr(audit_render, "_MAX_MEMO", 8)
    renderer = IssuanceRenderer()
    context, event, now, principal, scope, token, _, detail = CASES["hit"]
    for expires_in in range(30):
        tail = (f"2026-11-21T05:00:{expires_in:02d}Z", expires_in, "hit")
        args = (context, event, now, principal, scope, token, tail, detail)
        assert renderer.line(*args) == reference_issued(*args)
        assert len(renderer._middles) <= 8


def test_the_fast_path_renders_a_plain_record_without_the_scrub(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A record with no trigger word anywhere is spliced, not rebuilt and scanned (the point)."""
    renderer = IssuanceRenderer()
    renderer.line(*CASES["hit"])  # the middle, rendered once

    def general(*args: object) -> bytes:
        raise AssertionError("the general path ran")

    monkeypatch.setattr(audit_render, "_general", general)
    assert renderer.line(*CASES["hit"]) == reference_issued(*CASES["hit"])
    assert renderer.line(*CASES["presigned url"]) == reference_issued(*CASES["presigned url"])


_NO_DETAIL = [name for name, args in CASES.items() if not args[7]]


@pytest.mark.parametrize("name", _NO_DETAIL)
def test_spliced_parts_give_the_records_bytes_or_nothing(name: str) -> None:
    """``spliced`` parts with a time, hex request id and lifetime make ``line``'s very bytes."""
    context, event, now, principal, scope, token, tail, _ = CASES[name]
    ours = dataclasses.replace(context, request_id="0123456789abcdef0123456789abcdef")
    renderer = IssuanceRenderer()
    parts = renderer.spliced(ours, event, principal, scope, token, tail[0], tail[2])
    if parts is None:  # a value that may hold a named secret: the general path, every time
        assert name.startswith("secret in") or name == "no request context"
        return
    expected = reference_issued(ours, event, now, principal, scope, token, tail, {})
    assert parts.line(now, ours.request_id, tail[1]) == expected
    seven = reference_issued(ours, event, now, principal, scope, token, (tail[0], 7, tail[2]), {})
    assert parts.line(now, ours.request_id, 7) == seven


def test_spliced_parts_hold_no_secret_of_the_token() -> None:
    """The kept parts carry the AccessKeyId, never the secret nor the SecurityToken."""
    context, event, _, principal, scope, token, tail, _ = CASES["hit"]
    parts = IssuanceRenderer().spliced(context, event, principal, scope, token, tail[0], tail[2])
    assert parts is not None
    kept = parts.after_time + parts.after_request_id + parts.after_expires_in
    assert token.access_key_id.encode() in kept
    assert token.access_key_secret.encode() not in kept
    assert token.security_token.encode() not in kept
