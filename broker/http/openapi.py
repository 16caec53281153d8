"""The OpenAPI 3.1 description of the HTTP API, built from the code it describes.

Request bodies are the pydantic models' own JSON Schemas, error codes come
from the exception classes and limits from the modules that enforce them, so
the document cannot drift from the validation it describes.
``tests/http/test_openapi.py`` fails when a route of ``app.py`` is missing
here, validates the document, and fuzzes a running broker against it.
The component schemas (request bodies, replies, errors) are built in
``broker.http.openapi_schemas``; this module builds the operations around them.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from functools import cache
from typing import Any

from pydantic import BaseModel

from broker import __version__
from broker.errors import (
    AccessDenied,
    AuditUnavailable,
    AuthenticationFailed,
    BrokerError,
    BucketAmbiguous,
    IdentityProviderUnavailable,
    NotFound,
    RequestInvalid,
    RequestTooLarge,
    TemplateValueRejected,
    TooManyRequests,
    UpstreamError,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from broker.http.openapi_schemas import (
    REQUEST_ID_REGEX,
    SCHEMAS_REF,
    component_schemas,
    error_schema,
    policy_name_pattern,
)
from broker.scopes import (
    ACTIONS_PATTERN,
    BUCKET_PATTERN,
    KEY_PATTERN,
    MAX_KEY_CHARS,
    PREFIX_PATTERN,
)
from broker.uploads import PostPolicyBody, PresignBody

__all__ = ["openapi_document"]

_JSON = "application/json"
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}, {"accessToken": []}]

_ErrorClasses = tuple[type[BrokerError], ...]
_CALLER = (RequestInvalid, AuthenticationFailed, TooManyRequests, IdentityProviderUnavailable)
_SCOPED = (*_CALLER, AccessDenied, TemplateValueRejected)
_STS = (UpstreamError, UpstreamThrottled, UpstreamUnavailable, UpstreamTimeout)
_ISSUING = (*_STS, AuditUnavailable)
_SIGNING = (*_SCOPED, BucketAmbiguous, RequestTooLarge, *_ISSUING)
_RETRY_AFTER = (
    TooManyRequests,
    UpstreamThrottled,
    UpstreamUnavailable,
    UpstreamTimeout,
    AuditUnavailable,
    IdentityProviderUnavailable,
)
_WHEN: dict[int, str] = {
    400: "Malformed input: parameter, body, or a token given twice; `BucketAmbiguous`: a "
    "presign or post-policy request names no `bucket` under a policy with several.  (A "
    "request head the HTTP parser refuses, such as a header line over "
    "`listen.max_header_bytes` or one with a control byte, gets this 400 too, before any "
    "handler runs.)",
    401: "No token, an unknown key or invalid JWT, or a scheme other than Bearer.",
    403: "The policy does not exist or may not be used by this caller (the same reply either "
    "way), the key or content type is outside what it allows, a value of the caller's "
    "identity cannot be rendered safely into the prefix, or a restricted API key "
    "(`auth.api_keys[].allow`) was used for a route or policy it does not allow.",
    404: "The path does not name a route (e.g. an empty policy name).",
    413: "The body is over `listen.max_body_bytes`.",
    429: "This caller has caused more STS calls than its share (`quotas.caller_sts_*`), or "
    "is over the request-rate quota (off by default); `Retry-After` says when to retry.",
    502: "STS refused the call (a 4xx answer) or sent credentials the broker refuses (no or "
    "unparseable `Expiration`, already expired, or further out than asked for).  Not retried.",
    503: "STS is throttling, answering 5xx, unreachable or sent no usable reply, and retries "
    "within `sts.retry.deadline_seconds` did not help; or (JWT callers) the identity "
    "provider's keys cannot be loaded; or (`audit.mode: required`) the audit record could "
    "not be written, so nothing was issued.  `Retry-After` says when to retry.",
    504: "STS did not answer within `sts.timeout_seconds` (the last attempt cut to what was left "
    "of `sts.retry.deadline_seconds`); `Retry-After` says when to retry.",
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 document served at ``/openapi.json``: built once, a fresh copy per call."""
    document: dict[str, Any] = json.loads(_document_text())
    return document


@cache
def _document_text() -> str:
    return json.dumps(_document(), separators=(",", ":"))


def _document() -> dict[str, Any]:
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "oss-sts-broker",
            "version": __version__,
            "summary": "Temporary, narrowly scoped Alibaba Cloud STS credentials and "
            "presigned URLs for OSS.",
            "description": _DESCRIPTION,
        },
        "paths": {
            "/v1/credentials/{policy}": {"get": _credentials_operation()},
            "/v1/presign": {"post": _presign_operation()},
            "/v1/post-policy": {"post": _post_policy_operation()},
            "/v1/policies": {"get": _policies_operation()},
            "/healthz": {"get": _healthz_operation()},
            "/readyz": {"get": _readyz_operation()},
            "/metrics": {"get": _metrics_operation()},
            "/openapi.json": {"get": _openapi_operation()},
        },
        "components": {
            "schemas": component_schemas(),
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "`Authorization: Bearer <API key or OIDC JWT>`.",
                },
                "accessToken": {
                    "type": "apiKey",
                    "in": "query",
                    "name": "access_token",
                    "description": "For clients that cannot set headers (the credentials-URI "
                    "providers); never logged by the broker, but alibabacloud-credentials puts the "
                    "whole URL in its error messages: give such a client a key restricted with "
                    "`auth.api_keys[].allow`.  Giving it together with an `Authorization` header, "
                    "or twice, is a 400.",
                },
            },
        },
    }


_DESCRIPTION = """\
Every reply carries `X-Request-Id`: a well-formed incoming one (8-64 characters of
`[A-Za-z0-9._-]`) is kept, otherwise one is generated.  Errors are
`{"error": {"code", "message", "request_id"}}` with a stable `code`.  Every GET also
answers HEAD.  A route called with another method answers 405 `MethodNotAllowed`, an
unknown path 404 `NotFound`.  CORS preflights (`OPTIONS` with `Origin` and
`Access-Control-Request-Method`) answer 204 for the configured origins and 403
`CorsRejected` otherwise."""


# --- operations ---


def _credentials_operation() -> dict[str, Any]:
    return {
        "operationId": "getCredentials",
        "summary": "Scoped STS credentials for this policy and caller.",
        "description": "Compatible with the STS `AssumeRole` reply, the credentials-URI provider "
        "and the OSS mobile SDKs' auth-server format, and safe to return unchanged from ali-oss's "
        "`refreshSTSToken`; the OSS location is under `Oss`.  Errors also carry `StatusCode`, "
        "`ErrorCode`, `ErrorMessage` and `Code`.",
        "security": _SECURED,
        "parameters": [
            {
                "name": "policy",
                "in": "path",
                "required": True,
                "description": "The policy's name.",
                "schema": {"type": "string", "pattern": policy_name_pattern()},
                "example": "avatar-upload",
            },
            {
                "name": "min_ttl_seconds",
                "in": "query",
                "required": False,
                "description": "Fetch a fresh token first if the cached one has less validity "
                "left; at most the token's lifetime (`effective_lifetime_seconds`, else "
                "`duration_seconds`) minus `cache.refresh_margin_seconds` (400 past it).",
                "schema": {"type": "integer", "minimum": 0},
            },
            *_narrowing_parameters(),
            _request_id_parameter(),
        ],
        "responses": {
            "200": _ok("Credentials", "Credentials", no_store=True),
            **_errors((*_SCOPED, *_ISSUING), sts_compatible=True),
            # An unroutable path (an empty name) is answered before any route, so plainly.
            **_errors((NotFound,)),
        },
    }


def _narrowing_parameters() -> list[dict[str, Any]]:
    """``bucket``, ``prefix``, ``key``, ``actions``: ask for less than the policy gives."""
    # The 1023-character limit is in words, not maxLength: a fuzzer aiming past it writes
    # request lines beyond listen.max_header_bytes, refused before any route (plain 400).
    path = {"description": f"At most {MAX_KEY_CHARS} characters."}
    described: list[tuple[str, str, dict[str, Any]]] = [
        ("bucket", "only the grants in this bucket", {"pattern": f"^{BUCKET_PATTERN}$"}),
        ("prefix", "only under this prefix (ending in `/`), itself under one of the caller's "
         "prefixes; not with `key`", {**path, "pattern": f"^{PREFIX_PATTERN}$"}),
        ("key", "only this one object, under one of the caller's prefixes; never `list`",
         {**path, "pattern": f"^{KEY_PATTERN}$"}),
        ("actions", "only these actions (comma-separated), each granted by the policy",
         {"pattern": f"^{ACTIONS_PATTERN}$", "example": "get,list"}),
    ]  # fmt: skip
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": f"Narrowing: {text} (403 if outside the caller's scope); the token "
            "is cached under its own key.",
            "schema": {"type": "string", **schema},
        }
        for name, text, schema in described
    ]


def _presign_operation() -> dict[str, Any]:
    return {
        "operationId": "createPresignedUrl",
        "summary": "A V4 presigned URL for one operation on one key under the caller's prefix.",
        "description": "Signed for the grant holding the key, in `bucket` (needed only when the "
        "policy's grants name several buckets: 400 `BucketAmbiguous` otherwise); that grant's "
        "actions decide (403 naming its prefix).",
        "security": _SECURED,
        "parameters": [_request_id_parameter()],
        "requestBody": _body(PresignBody),
        "responses": {
            "200": _ok("The presigned URL.", "PresignedUrl", no_store=True),
            **_errors(_SIGNING),
        },
    }


def _post_policy_operation() -> dict[str, Any]:
    return {
        "operationId": "createPostPolicy",
        "summary": "Signed PostObject form fields for a browser upload.",
        "description": "For the grant holding `key` or `key_prefix` (default: the first grant "
        "allowing `put`), which must allow `put`; `bucket` as for `/v1/presign`.",
        "security": _SECURED,
        "parameters": [_request_id_parameter()],
        "requestBody": _body(PostPolicyBody),
        "responses": {
            "200": _ok("Post the fields plus `file` to `host`.", "PostPolicy", no_store=True),
            **_errors(_SIGNING),
        },
    }


def _policies_operation() -> dict[str, Any]:
    return {
        "operationId": "listPolicies",
        "summary": "The policies this caller may use, with its rendered prefixes.",
        "description": "`bucket`, `prefix` and `actions` are the first (primary) grant's; "
        "`grants` lists every grant, the primary first.",
        "security": _SECURED,
        "parameters": [_request_id_parameter()],
        "responses": {
            "200": _ok("The usable policies.", "PolicyList"),
            **_errors((*_CALLER, AccessDenied, TemplateValueRejected)),
        },
    }


def _healthz_operation() -> dict[str, Any]:
    return _public("health", "The process is alive.", {"200": _ok("Alive.", "Health")})


def _readyz_operation() -> dict[str, Any]:
    return _public(
        "readiness",
        "Policies loaded, source credentials available, not shutting down.  `sts` reports "
        "STS's state as the latest AssumeRole attempts saw it (`degraded` while they fail): "
        "informational, never a reason to be unready.",
        {"200": _ok("Ready.", "Readiness"), "503": _ok("Not ready.", "Readiness")},
    )


def _metrics_operation() -> dict[str, Any]:
    text = {"text/plain": {"schema": {"type": "string"}}}
    return _public(
        "metrics",
        "Prometheus text exposition format.",
        {"200": {"description": "The metrics.", "headers": _headers(), "content": text}},
    )


def _openapi_operation() -> dict[str, Any]:
    schema = {
        "type": "object",
        "required": ["openapi", "info", "paths"],
        "properties": {"openapi": {"const": "3.1.0"}},
    }
    return _public(
        "openapi",
        "This document.",
        {"200": {"description": "OpenAPI 3.1.", "headers": _headers(), "content": _json(schema)}},
    )


def _public(operation_id: str, summary: str, responses: dict[str, Any]) -> dict[str, Any]:
    return {
        "operationId": operation_id,
        "summary": summary,
        "security": [],
        "parameters": [_request_id_parameter()],
        "responses": responses,
    }


# --- building blocks ---


def _request_id_parameter() -> dict[str, Any]:
    return {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": "Kept as the request id if it is 8-64 characters of `[A-Za-z0-9._-]`.",
        "schema": {"type": "string"},
    }


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": _json({"$ref": SCHEMAS_REF + model.__name__})}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {_JSON: {"schema": schema}}


def _headers(*, no_store: bool = False, retry_after: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "X-Request-Id": {
            "required": True,
            "schema": {"type": "string", "pattern": REQUEST_ID_REGEX},
        },
    }
    if no_store:
        headers["Cache-Control"] = {"required": True, "schema": {"const": "no-store"}}
    if retry_after:
        headers["Retry-After"] = {
            "required": True,
            "description": "Seconds to wait before retrying.",
            "schema": {"type": "integer", "minimum": 1},
        }
    return headers


def _ok(description: str, schema_name: str, *, no_store: bool = False) -> dict[str, Any]:
    return {
        "description": description,
        "headers": _headers(no_store=no_store),
        "content": _json({"$ref": SCHEMAS_REF + schema_name}),
    }


def _errors(classes: _ErrorClasses, *, sts_compatible: bool = False) -> dict[str, Any]:
    """One response per status the classes carry, each listing its possible codes."""
    by_status: dict[int, list[type[BrokerError]]] = {}
    for cls in classes:
        by_status.setdefault(cls.status, []).append(cls)
    return {
        str(status): _error_response(status, members, sts_compatible=sts_compatible)
        for status, members in sorted(by_status.items())
    }


def _error_response(
    status: int, classes: Iterable[type[BrokerError]], *, sts_compatible: bool
) -> dict[str, Any]:
    members = tuple(classes)
    codes = sorted({cls.code for cls in members})
    return {
        "description": _WHEN[status],
        "headers": _headers(
            no_store=True, retry_after=any(issubclass(cls, _RETRY_AFTER) for cls in members)
        ),
        "content": _json(error_schema(status, codes, sts_compatible=sts_compatible)),
    }
