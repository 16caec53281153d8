"""The OpenAPI document's component schemas: request bodies from the models, and replies.

Split from ``broker.http.openapi`` (which builds the operations around them):
request bodies are the pydantic models' own JSON Schemas, reply schemas are
built here from the limits of the modules that enforce them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from broker.names import REQUEST_ID_PATTERN
from broker.policy_fields import Grant
from broker.scopes import ACTION_NAMES
from broker.signing import MAX_EXPIRES_SECONDS
from broker.uploads import OPERATIONS, PostPolicyBody, PresignBody

__all__ = [
    "REQUEST_ID_REGEX",
    "SCHEMAS_REF",
    "closed_object",
    "component_schemas",
    "error_schema",
    "policy_name_pattern",
]

SCHEMAS_REF = "#/components/schemas/"
"""Where ``$ref`` finds the component schemas."""
REQUEST_ID_REGEX = f"^{REQUEST_ID_PATTERN}$"
_ISO_SECONDS = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$"


def component_schemas() -> dict[str, Any]:
    """Every schema of ``components.schemas``: the request bodies, then the replies."""
    return {**_model_schemas(PresignBody, PostPolicyBody), **_response_schemas()}


def policy_name_pattern() -> str:
    """The policy-name pattern, as the request models declare it."""
    pattern: str = PresignBody.model_json_schema()["properties"]["policy"]["pattern"]
    return pattern


def closed_object(**properties: dict[str, Any]) -> dict[str, Any]:
    """A closed JSON object whose properties are all required."""
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(properties),
        "properties": properties,
    }


def error_schema(status: int, codes: list[str], *, sts_compatible: bool) -> dict[str, Any]:
    """An error reply's body with one of ``codes`` (``sts_compatible``: mobile SDK fields too)."""
    code = {"type": "string", "enum": codes}
    schema: dict[str, Any] = closed_object(
        error=closed_object(
            code=code,
            message={"type": "string"},
            request_id={"type": "string", "pattern": REQUEST_ID_REGEX},
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


def _model_schemas(*models: type[BaseModel]) -> dict[str, Any]:
    """The models' validation JSON Schemas, with their ``$defs`` hoisted into components."""
    schemas: dict[str, Any] = {}
    for model in models:
        schema = model.model_json_schema(ref_template=SCHEMAS_REF + "{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
    return schemas


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
        "Credentials": closed_object(
            Code={"const": "Success"},
            StatusCode={"const": 200},
            RequestId={"type": "string", "pattern": REQUEST_ID_REGEX},
            **secrets,
            ExpiresIn={"type": "integer", "minimum": 0},
            Credentials=closed_object(**secrets),
            Oss=_oss_location(),
        ),
        "PresignedUrl": closed_object(
            url={"type": "string", "format": "uri"},
            method={"type": "string", "enum": sorted({op.method for op in OPERATIONS.values()})},
            expiration=expiration,
            expires_in=lifetime,
            signed_headers={"type": "object", "additionalProperties": string},
            clamped={"type": "boolean"},
            requested_expires_seconds=lifetime,
        ),
        "PostPolicy": closed_object(
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
        "PolicyList": closed_object(policies={"type": "array", "items": _policy_description()}),
        "Health": closed_object(status={"const": "ok"}),
        "Readiness": closed_object(
            status={"type": "string", "enum": ["ready", "not_ready"]},
            checks={
                "type": "object",
                "required": ["policies_loaded", "source_credentials", "accepting_requests"],
                "additionalProperties": {"type": "boolean"},
            },
            sts=closed_object(
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
    location = closed_object(
        Bucket=string,
        Region=string,
        Endpoint=_ENDPOINT_URL,
        Prefix=string,
        AddressStyle=_ADDRESS_STYLE,
    )
    location["description"] = (
        "Where the credentials may be used: the first (primary) grant's bucket and prefix.  "
        "Breaking change: these fields were at the top level before; they moved so that the "
        "reply is safe to return unchanged from ali-oss's `refreshSTSToken`, which merges every "
        "top-level key into its client options."
    )
    key = {"type": "string", "description": "The one object the token was narrowed to (`key`)."}
    actions = {"type": "array", "items": {"type": "string", "enum": list(ACTION_NAMES)}}
    grant = closed_object(Bucket=string, Prefix=string, Actions=actions)
    grant["properties"]["Key"] = key
    grants = {
        "type": "array",
        "minItems": 2,
        "items": grant,
        "description": "Every grant, the primary first; only when the token carries several.",
    }
    location["properties"].update(Key=key, Grants=grants)
    return location


def _policy_description() -> dict[str, Any]:
    actions = Grant.model_json_schema()["properties"]["actions"]
    string = {"type": "string"}
    return closed_object(
        name={"type": "string", "pattern": policy_name_pattern()},
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
        multipart_part_bytes={
            "anyOf": [{"type": "integer", "minimum": 102400}, {"type": "null"}],
            "description": "The part size presigned multipart uploads keep to (see `upload_part`).",
        },
        forbid_overwrite={"type": "boolean"},
        grants=_grants_description(actions),
    )


def _grants_description(actions: dict[str, Any]) -> dict[str, Any]:
    """``grants`` of ``GET /v1/policies``: every grant, rendered for the caller, in one shape."""
    string = {"type": "string"}
    key = {"anyOf": [string, {"type": "null"}], "description": "One object, or null: a prefix."}
    return {
        "type": "array",
        "minItems": 1,
        "items": closed_object(bucket=string, prefix=string, key=key, actions=actions),
        "description": "Every grant, the primary first: `bucket`, rendered `prefix`, `key` "
        "(null unless a grant covers one object) and `actions`.",
    }
