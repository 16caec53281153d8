"""Audit records as JSON lines: any record scrubbed of named secrets, issuances on a fast path.

An issuance record's fields, in this order (docs/deployment.md, "Audit trail")::

    time type event request_id route client_address      ← per request
    caller auth_method policy role_arn federation region
    bucket prefix actions [key] narrowed policy_digest [grants]  ← fixed per (caller, scope)
    [detail: operation key key_prefix clamped ...]       ← per request
    access_key_id expiration expires_in cache sts_request_id  ← per token and request

The fixed middle is rendered once per caller, scope and token (and event,
route, expiration, cache: values that repeat) into JSON bytes, kept in a
bounded memo that holds no secret, and spliced into each record as an
``orjson.Fragment`` (the value of ``caller``, followed by the members after
it); a record's bytes are
those ``render_line`` gives for the same fields (tests/test_audit_render.py
pins them against the former renderer).  Whenever a value of the record may
hold a named secret (the scrub's own cheap test, ``broker.logs``), or a detail
field reuses a name, the record takes the general path: built as a dict and
rendered by ``render_line``, scrub included.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

# The scrub's cheap test: ``scrub_named(text)`` is ``text`` whenever it says no.
from broker.logs import may_hold_named_secret, scrub_named
from broker.models import Credentials, Principal
from broker.ram import RamGrant
from broker.request_context import RequestContext
from broker.scopes import Scope

__all__ = ["IssuanceRenderer", "RecordParts", "issuance_record", "render_line", "who"]

_HEAD = ("time", "type", "event", "request_id", "route", "client_address")
_TAIL = ("access_key_id", "expiration", "expires_in", "cache", "sts_request_id")
_MAX_MEMO = 4096
_CALLER_KEY = b'{"caller":'


def render_line(record: Mapping[str, Any]) -> bytes:
    """One JSON line, scrubbed of named secrets.

    The scrub's patterns all need a trigger word inside a value (no key of a
    record names a secret), so the whole line is scanned only when the
    values are: a record's key names (``auth_method``) would trigger a slow
    full scan on every line for nothing.  (The one list, ``actions``, holds
    validated action names.)
    """
    text = orjson.dumps(record).decode()
    values = "\n".join([value for value in record.values() if type(value) is str])
    if scrub_named(values) != values:
        text = scrub_named(text)
    return (text + "\n").encode()


def who(context: RequestContext, kind: str, event: str, now: str) -> dict[str, Any]:
    """The fields every record has: when, which request, who asked and from where."""
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


def issuance_record(
    context: RequestContext, event: str, principal: Principal, scope: Scope, now: str
) -> dict[str, Any]:
    """Who got what: the scope as handed out (narrowed, if the request asked for less)."""
    record = who(context, "issuance", event, now)
    record.update(_fixed(principal, scope))
    return record


def _fixed(principal: Principal, scope: Scope) -> dict[str, Any]:
    """The fields of an issuance fixed by its caller and scope, from ``caller`` on."""
    policy = scope.policy
    fields = {
        "caller": principal.subject,
        "auth_method": principal.auth_method,
        "policy": policy.name,
        "role_arn": policy.role_arn,
        "federation": policy.federation,
        "region": policy.region,
        **_grant(scope.grants[0]),
        "narrowed": scope.narrowed,
        "policy_digest": scope.digest,
    }
    if len(scope.grants) > 1:
        fields["grants"] = [_grant(grant) for grant in scope.grants]
    return fields


def _grant(grant: RamGrant) -> dict[str, Any]:
    """A grant's bucket, prefix, actions, and key when it covers one object."""
    fields: dict[str, Any] = {
        "bucket": grant.bucket,
        "prefix": grant.prefix,
        "actions": list(grant.actions),
    }
    if grant.key is not None:
        fields["key"] = grant.key
    return fields


@dataclass(frozen=True, slots=True)
class _Middle:
    """The fixed middle of the records of one (caller, scope, token...), rendered."""

    scope: Scope
    """Held, and compared with ``is``: its ``id()`` cannot name another scope while this lives."""
    caller: orjson.Fragment
    """``"<caller>","auth_method":...`` up to the last fixed member: the value of ``caller``."""
    names: frozenset[str]
    """Every field name of the record but the detail's."""
    suspect: bool
    """Whether a value it stands for may hold a named secret (then: the general path)."""


_Args = tuple[RequestContext, str, str, Principal, Scope, Credentials, tuple[str, int, str]]
"""``IssuanceRenderer.line``'s arguments but the detail."""
_Key = tuple[int, str, str, str, str | None, str, str, str, str | None]
"""scope id, caller, auth method; event, route, expiration, cache, AccessKeyId, STS RequestId."""


def _middle(principal: Principal, scope: Scope, repeated: Sequence[object]) -> _Middle:
    """The middle of ``principal``'s records under ``scope``; ``repeated``: the key's values."""
    fields = _fixed(principal, scope)
    rendered = orjson.dumps(fields)
    values = [value for value in fields.values() if type(value) is str]
    values += [str(value) for value in repeated]  # a false alarm is harmless: general path
    return _Middle(
        scope=scope,
        caller=orjson.Fragment(rendered[len(_CALLER_KEY) : -1]),
        names=_names(tuple(fields)),
        suspect=may_hold_named_secret("\n".join(values).lower()),
    )


@functools.cache
def _names(fixed: tuple[str, ...]) -> frozenset[str]:
    """Every field name of an issuance record with these fixed fields (a handful of shapes)."""
    return frozenset((*_HEAD, *fixed, *_TAIL))


class IssuanceRenderer:
    """Renders issuance records, their fixed middle from a memo (not thread-safe).

    The memo's key is everything of a record that repeats: the scope (by
    identity, held), the caller, and the event, route, expiration, cache and
    token; only the time, request id, client address, lifetime left and
    detail are rendered, and tested for named secrets, per record.  At most
    ``_MAX_MEMO`` entries, then it starts afresh.
    """

    def __init__(self) -> None:
        self._middles: dict[_Key, _Middle] = {}

    def line(
        self,
        context: RequestContext,
        event: str,
        now: str,
        principal: Principal,
        scope: Scope,
        token: Credentials,
        tail: tuple[str, int, str],
        detail: Mapping[str, object],
    ) -> bytes:
        """The record's line; ``tail`` is (expiration, expires_in, cache).

        ``now`` is ``Auditor._now()``'s text (digits: never tested for secrets).
        """
        middle = self._middle_of(context, event, principal, scope, token, tail)
        if middle.suspect or not middle.names.isdisjoint(detail):
            return _general(context, event, now, principal, scope, token, tail, detail)
        args = (context, event, now, principal, scope, token, tail)
        return _with_detail(args, detail, middle.caller)

    def _middle_of(
        self,
        context: RequestContext,
        event: str,
        principal: Principal,
        scope: Scope,
        token: Credentials,
        tail: tuple[str, int, str],
    ) -> _Middle:
        key: _Key = (
            id(scope),
            principal.subject,
            principal.auth_method,
            event,
            context.route,
            tail[0],
            tail[2],
            token.access_key_id,
            token.sts_request_id,
        )
        middle = self._middles.get(key)
        if middle is None or middle.scope is not scope:
            if len(self._middles) >= _MAX_MEMO:
                self._middles.clear()
            middle = self._middles[key] = _middle(principal, scope, key[3:])
        return middle

    def spliced(
        self,
        context: RequestContext,
        event: str,
        principal: Principal,
        scope: Scope,
        token: Credentials,
        expiration: str,
        cache: str,
    ) -> RecordParts | None:
        """The bytes of ``line``'s records of this request's caller, route and address around
        their time, request id and ``expires_in`` (``RecordParts``); ``None`` when such records
        take the general path (a value that may hold a named secret)."""
        tail = (expiration, 0, cache)
        middle = self._middle_of(context, event, principal, scope, token, tail)
        if middle.suspect or may_hold_named_secret(str(context.client_address).lower()):
            return None
        marked = RequestContext("R", context.route, context.client_address)
        line = _with_detail((marked, event, "T", principal, scope, token, tail), {}, middle.caller)
        at_id, at_in = line.find(b',"request_id":"R",'), line.find(b',"expires_in":0,')
        if not line.startswith(b'{"time":"T",') or at_id < 0 or at_in < 0:
            return None
        return RecordParts(line[10 : at_id + 15], line[at_id + 16 : at_in + 14], line[at_in + 15 :])


@dataclass(frozen=True, slots=True)
class RecordParts:
    """An issuance record's bytes but its time, request id and ``expires_in``."""

    after_time: bytes
    """``","type":...,"request_id":"``."""
    after_request_id: bytes
    """``","route":...,"expires_in":``."""
    after_expires_in: bytes
    """``,"cache":...}`` and the newline."""

    def line(self, now: str, request_id: str, expires_in: int) -> bytes:
        """The record at ``now`` (``Auditor``'s text) of ``request_id`` (one of ours: hex)."""
        return b"".join(
            (
                b'{"time":"',
                now.encode(),
                self.after_time,
                request_id.encode(),
                self.after_request_id,
                str(expires_in).encode(),
                self.after_expires_in,
            )
        )


def _with_detail(args: _Args, detail: Mapping[str, object], caller: orjson.Fragment) -> bytes:
    """The line of a record around its rendered middle, with its detail fields if any.

    The values that change per record are tested (``time``, digits, and
    ``expires_in``, a number, cannot hold a name), the detail's formatted: a
    false alarm only sends the record down the general path.
    """
    context, event, now, _, _, token, tail = args
    varying = f"{context.request_id}\n{context.client_address}"
    if detail:
        varying += "\n" + "\n".join([str(value) for value in detail.values()])
    if may_hold_named_secret(varying.lower()):
        return _general(*args, detail)
    record: dict[str, object] = {
        "time": now,
        "type": "issuance",
        "event": event,
        "request_id": context.request_id,
        "route": context.route,
        "client_address": context.client_address,
        "caller": caller,
        **detail,
        "access_key_id": token.access_key_id,
        "expiration": tail[0],
        "expires_in": tail[1],
        "cache": tail[2],
        "sts_request_id": token.sts_request_id,
    }
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def _general(
    context: RequestContext,
    event: str,
    now: str,
    principal: Principal,
    scope: Scope,
    token: Credentials,
    tail: tuple[str, int, str],
    detail: Mapping[str, object],
) -> bytes:
    """The record built as a dict, rendered and scrubbed by ``render_line``."""
    expiration, expires_in, cache = tail
    record = issuance_record(context, event, principal, scope, now)
    record.update(detail)
    record.update(
        access_key_id=token.access_key_id,
        expiration=expiration,
        expires_in=expires_in,
        cache=cache,
        sts_request_id=token.sts_request_id,
    )
    return render_line(record)
