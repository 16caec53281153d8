"""JSON replies: the one encoder, and credential bodies rendered once per token and second.

A cached token is handed to many requests within one second with the same
``ExpiresIn``; its reply differs only in ``RequestId``.  ``CredentialReplies``
renders the body once per (token, scope, endpoint, ``ExpiresIn``) and splices
each request's id in, so a cache hit costs no JSON encoding.  Bodies are kept
for the current second only: secrets linger no longer than the token's own
cache entry, and the memo never grows past one second's distinct tokens.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from broker.models import Credentials
from broker.policies import Scope
from broker.ram import RamGrant
from broker.signing import OssEndpoint

__all__ = ["CredentialReplies", "json_response"]

_JSON = {"Content-Type": "application/json"}
_JSON_NO_STORE = {**_JSON, "Cache-Control": "no-store", "Pragma": "no-cache"}
_REQUEST_ID_SLOT = b'"RequestId":""'
_MAX_BODIES = 4096
_Rendered = tuple[Credentials, Scope, OssEndpoint, bytes, bytes]


def json_response(
    body: dict[str, Any] | bytes, status: int = 200, *, no_store: bool = False
) -> web.Response:
    """``body`` (or its encoded bytes) as ``application/json``; ``no_store`` for secrets."""
    headers = _JSON_NO_STORE if no_store else _JSON
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    return web.Response(status=status, body=data, headers=headers)


class CredentialReplies:
    """Credential reply bodies, rendered once per token, scope and ``ExpiresIn`` each second."""

    def __init__(self) -> None:
        self._second = -1
        self._bodies: dict[
            tuple[int, int, int], tuple[Credentials, Scope, OssEndpoint, bytes, bytes]
        ]
        self._bodies = {}

    def body(
        self,
        credentials: Credentials,
        scope: Scope,
        endpoint: OssEndpoint,
        expires_in: int,
        request_id: str,
        now: float,
    ) -> bytes:
        """The reply's bytes; ``request_id`` has passed ``names.REQUEST_ID`` (nothing to escape)."""
        second = int(now)
        if second != self._second:
            self._second = second
            self._bodies.clear()
        key = (id(credentials), id(scope), expires_in)
        found = self._bodies.get(key)
        if (
            found is None
            or found[0] is not credentials
            or found[1] is not scope
            or found[2] != endpoint
        ):
            head, tail = _split(credentials_reply(credentials, scope, endpoint, expires_in, ""))
            found = (credentials, scope, endpoint, head, tail)
            if len(self._bodies) < _MAX_BODIES:
                self._bodies[key] = found
        return b"".join((found[3], request_id.encode("ascii"), found[4]))


def _split(reply: dict[str, Any]) -> tuple[bytes, bytes]:
    """The body around its (empty) ``RequestId``: the first such field, before any value."""
    body = orjson.dumps(reply)
    at = body.index(_REQUEST_ID_SLOT) + len(_REQUEST_ID_SLOT) - 1
    return body[:at], body[at:]


def credentials_reply(
    credentials: Credentials, scope: Scope, endpoint: OssEndpoint, expires_in: int, request_id: str
) -> dict[str, Any]:
    """STS's shape, the credentials-URI provider's and the OSS mobile SDKs' at once.

    Safe to hand unchanged to ali-oss's ``refreshSTSToken``: ali-oss lower-cases
    the first letter of every top-level key and ``Object.assign``s them all into
    its client options (ali-oss 6.23.0 lib/common/utils/setSTSToken.js,
    formatObjKey.js), so no top-level key may name one of its options except
    the credentials themselves; the OSS location sits under ``Oss``
    (tests/http/test_credentials.py lists ali-oss's option names).
    """
    secrets = {
        "AccessKeyId": credentials.access_key_id,
        "AccessKeySecret": credentials.access_key_secret,
        "SecurityToken": credentials.security_token,
        "Expiration": credentials.expiration_iso(),
    }
    return {
        "Code": "Success",
        "StatusCode": 200,
        "RequestId": request_id,
        **secrets,
        "ExpiresIn": expires_in,
        "Credentials": secrets,
        "Oss": _oss_location(endpoint, scope),
    }


def _oss_location(endpoint: OssEndpoint, scope: Scope) -> dict[str, Any]:
    """Where the credentials may be used, as a client configures itself.

    ``Endpoint`` carries its scheme: alibabacloud-oss-v2 reads a bare host as
    HTTPS (alibabacloud_oss_v2/endpoints.py ``add_scheme``), which fails against
    an http:// emulator.  ``AddressStyle`` is alibabacloud-oss-v2's word
    (``AddressStyle`` in alibabacloud_oss_v2/_client.py): ``virtual``
    (bucket in the host), ``path`` (oss-v2 ``use_path_style``, oss2
    ``is_path_style``, ali-oss ``sldEnable`` unless the endpoint is an IP
    address: see docs/api.md) or ``cname`` (``use_cname``, ``is_cname``, ``cname``).
    The bucket and prefix are the first (primary) grant's; ``Key`` is there
    when the token was narrowed to one object, and ``Grants`` lists every
    grant when there are several.
    """
    location: dict[str, Any] = {
        "Bucket": scope.bucket,
        "Region": scope.policy.region,
        "Endpoint": endpoint.url,
        "Prefix": scope.prefix,
        "AddressStyle": endpoint.address_style,
    }
    if scope.key is not None:
        location["Key"] = scope.key
    if len(scope.grants) > 1:
        location["Grants"] = [_grant_location(grant) for grant in scope.grants]
    return location


def _grant_location(grant: RamGrant) -> dict[str, Any]:
    found: dict[str, Any] = {"Bucket": grant.bucket, "Prefix": grant.prefix}
    if grant.key is not None:
        found["Key"] = grant.key
    found["Actions"] = list(grant.actions)
    return found
