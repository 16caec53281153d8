"""The OpenAPI 3.1 description of the HTTP API, built from the code it describes.

Request bodies are the pydantic models' own JSON Schemas, error codes come
from the exception classes and limits from the modules that enforce them, so
the document cannot drift from the validation it describes.
``tests/http/test_openapi.py`` fails when a route of ``app.py`` is missing
here, validates the document, and fuzzes a running broker against it.
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
    AuthenticationFailed,
    BrokerError,
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
from broker.names import REQUEST_ID_PATTERN
from broker.policies import Policy
from broker.signing import MAX_EXPIRES_SECONDS
from broker.uploads import OPERATIONS, PostPolicyBody, PresignBody

__all__ = ["openapi_document"]

_JSON = "application/json"
_SCHEMAS = "#/components/schemas/"
_ISO_SECONDS = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"
_REQUEST_ID = f"^{REQUEST_ID_PATTERN}$"
_SECURED: list[dict[str, list[str]]] = [{"bearer": []}, {"accessToken": []}]

_ErrorClasses = tuple[type[BrokerError], ...]
_CALLER = (RequestInvalid, AuthenticationFailed, TooManyRequests, IdentityProviderUnavailable)
_SCOPED = (*_CALLER, AccessDenied, TemplateValueRejected)
_STS = (UpstreamError, UpstreamThrottled, UpstreamUnavailable, UpstreamTimeout)
_RETRY_AFTER = (
    TooManyRequests,
    UpstreamThrottled,
    UpstreamUnavailable,
    UpstreamTimeout,
    IdentityProviderUnavailable,
)
_WHEN: dict[int, str] = {
    400: "Malformed input: parameter, body, or a token given twice.  (A request head the HTTP "
    "parser refuses, such as a header line over `listen.max_header_bytes` or one with a "
    "control byte, gets this 400 too, before any handler runs.)",
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
    "provider's keys cannot be loaded.  `Retry-After` says when to retry.",
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
            "schemas": {**_model_schemas(PresignBody, PostPolicyBody), **_response_schemas()},
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
                "schema": {"type": "string", "pattern": _policy_name_pattern()},
                "example": "avatar-upload",
            },
            {
                "name": "min_ttl_seconds",
                "in": "query",
                "required": False,
                "description": "Fetch a fresh token first if the cached one has less validity "
                "left; at most the policy's `duration_seconds` minus "
                "`cache.refresh_margin_seconds` (400 past it).",
                "schema": {"type": "integer", "minimum": 0},
            },
            _request_id_parameter(),
        ],
        "responses": {
            "200": _ok("Credentials", "Credentials", no_store=True),
            **_errors((*_SCOPED, *_STS), sts_compatible=True),
            # An unroutable path (an empty name) is answered before any route, so plainly.
            **_errors((NotFound,)),
        },
    }


def _presign_operation() -> dict[str, Any]:
    return {
        "operationId": "createPresignedUrl",
        "summary": "A V4 presigned URL for one operation on one key under the caller's prefix.",
        "security": _SECURED,
        "parameters": [_request_id_parameter()],
        "requestBody": _body(PresignBody),
        "responses": {
            "200": _ok("The presigned URL.", "PresignedUrl", no_store=True),
            **_errors((*_SCOPED, RequestTooLarge, *_STS)),
        },
    }


def _post_policy_operation() -> dict[str, Any]:
    return {
        "operationId": "createPostPolicy",
        "summary": "Signed PostObject form fields for a browser upload.",
        "security": _SECURED,
        "parameters": [_request_id_parameter()],
        "requestBody": _body(PostPolicyBody),
        "responses": {
            "200": _ok("Post the fields plus `file` to `host`.", "PostPolicy", no_store=True),
            **_errors((*_SCOPED, RequestTooLarge, *_STS)),
        },
    }


def _policies_operation() -> dict[str, Any]:
    return {
        "operationId": "listPolicies",
        "summary": "The policies this caller may use, with its rendered prefix.",
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


def _policy_name_pattern() -> str:
    """The policy-name pattern, as the request models declare it."""
    pattern: str = PresignBody.model_json_schema()["properties"]["policy"]["pattern"]
    return pattern


def _request_id_parameter() -> dict[str, Any]:
    return {
        "name": "X-Request-Id",
        "in": "header",
        "required": False,
        "description": "Kept as the request id if it is 8-64 characters of `[A-Za-z0-9._-]`.",
        "schema": {"type": "string"},
    }


def _body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": _json({"$ref": _SCHEMAS + model.__name__})}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {_JSON: {"schema": schema}}


def _headers(*, no_store: bool = False, retry_after: bool = False) -> dict[str, Any]:
    headers: dict[str, Any] = {
        "X-Request-Id": {"required": True, "schema": {"type": "string", "pattern": _REQUEST_ID}},
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
        "content": _json({"$ref": _SCHEMAS + schema_name}),
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
        "content": _json(_error_schema(status, codes, sts_compatible=sts_compatible)),
    }


def _error_schema(status: int, codes: list[str], *, sts_compatible: bool) -> dict[str, Any]:
    code = {"type": "string", "enum": codes}
    schema: dict[str, Any] = _object(
        error=_object(
            code=code,
            message={"type": "string"},
            request_id={"type": "string", "pattern": _REQUEST_ID},
        )
    )
    if sts_compatible:
        # The OSS mobile SDKs' auth-server format and the credentials-URI provider.
        extra = {
            "StatusCode": {"const": status},
            "ErrorCode": code,
            "ErrorMessage": {"type": "string"},
            "Code": code,
        }
        schema["properties"].update(extra)
        schema["required"].extend(extra)
    return schema


def _object(**properties: dict[str, Any]) -> dict[str, Any]:
    """A closed JSON object whose properties are all required."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(properties),
        "properties": properties,
    }


def _model_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """The models' validation JSON Schemas, with their ``$defs`` hoisted into components."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=_SCHEMAS + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


# --- response schemas ---


def _response_schemas() -> dict[str, Any]:
    string = {"type": "string"}
    expiration = {"type": "string", "pattern": _ISO_SECONDS}
    lifetime = {"type": "integer", "minimum": 1, "maximum": MAX_EXPIRES_SECONDS}
    secrets = {
        "AccessKeyId": string,
        "AccessKeySecret": string,
        "SecurityToken": string,
        "Expiration": expiration,
    }
    return {
        "Credentials": _object(
            Code={"const": "Success"},
            StatusCode={"const": 200},
            RequestId={"type": "string", "pattern": _REQUEST_ID},
            **secrets,
            ExpiresIn={"type": "integer", "minimum": 0},
            Credentials=_object(**secrets),
            Oss=_oss_location(),
        ),
        "PresignedUrl": _object(
            url={"type": "string", "format": "uri"},
            method={"type": "string", "enum": sorted({op.method for op in OPERATIONS.values()})},
            expiration=expiration,
            expires_in=lifetime,
            signed_headers={"type": "object", "additionalProperties": string},
            clamped={"type": "boolean"},
            requested_expires_seconds=lifetime,
        ),
        "PostPolicy": _object(
            host={"type": "string", "format": "uri"},
            fields={
                "type": "object",
                "required": ["key", "policy"],
                "additionalProperties": string,
            },
            expiration=expiration,
            expires_in=lifetime,
            clamped={"type": "boolean"},
            requested_expires_seconds=lifetime,
        ),
        "PolicyList": _object(policies={"type": "array", "items": _policy_description()}),
        "Health": _object(status={"const": "ok"}),
        "Readiness": _object(
            status={"type": "string", "enum": ["ready", "not_ready"]},
            checks={
                "type": "object",
                "required": ["policies_loaded", "source_credentials", "accepting_requests"],
                "additionalProperties": {"type": "boolean"},
            },
            sts=_object(
                state={"type": "string", "enum": ["unknown", "ok", "degraded"]},
                consecutive_failures={"type": "integer", "minimum": 0},
                cached_credentials={"type": "integer", "minimum": 0},
            ),
        ),
    }


_ENDPOINT_URL = {
    "type": "string",
    "pattern": "^https?://[^/?#@]+$",
    "description": "The OSS endpoint with its scheme, e.g. `https://oss-cn-hangzhou.aliyuncs.com` "
    "(`http://127.0.0.1:PORT` in dev mode): usable as given.",
}
_ADDRESS_STYLE = {
    "type": "string",
    "enum": ["virtual", "path", "cname"],
    "description": "How to address the bucket: `virtual` (bucket in the host name), `path` "
    "(bucket in the path; alibabacloud-oss-v2 `use_path_style`, ali-oss `sldEnable` except for an "
    "IP-address endpoint) or `cname` "
    "(the endpoint serves the bucket; oss-v2 `use_cname`, ali-oss `cname`).",
}


def _oss_location() -> dict[str, Any]:
    string = {"type": "string"}
    location = _object(
        Bucket=string,
        Region=string,
        Endpoint=_ENDPOINT_URL,
        Prefix=string,
        AddressStyle=_ADDRESS_STYLE,
    )
    location["description"] = (
        "Where the credentials may be used.  Breaking change: these fields were at the top "
        "level before; they moved so that the reply is safe to return unchanged from ali-oss's "
        "`refreshSTSToken`, which merges every top-level key into its client options."
    )
    return location


def _policy_description() -> dict[str, Any]:
    actions = Policy.model_json_schema()["properties"]["actions"]
    string = {"type": "string"}
    return _object(
        name={"type": "string", "pattern": _policy_name_pattern()},
        description=string,
        bucket=string,
        region=string,
        endpoint=_ENDPOINT_URL,
        address_style=_ADDRESS_STYLE,
        prefix=string,
        actions=actions,
        duration_seconds={"type": "integer", "minimum": 900, "maximum": 43200},
        max_url_expires_seconds={"type": "integer", "minimum": 1, "maximum": MAX_EXPIRES_SECONDS},
        content_types={"type": "array", "items": string},
        max_object_bytes={"anyOf": [{"type": "integer", "minimum": 1}, {"type": "null"}]},
        forbid_overwrite={"type": "boolean"},
    )
