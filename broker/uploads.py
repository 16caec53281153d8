"""What a caller may sign: operations, object keys, headers, upload guards and expiry clamping.

Pure rules, no I/O: ``broker.vending`` feeds them a parsed body, a policy and
the caller's rendered prefix, and hands the result to ``broker.signing``.
The upload guards of a policy (``forbid_overwrite``, ``max_object_bytes``)
become signed headers here; ``broker.downloads`` checks a GET's ``response-*``
and ``broker.post_forms`` builds PostObject forms from the same checks.
"""

from __future__ import annotations

import base64
import functools
import json
import math
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr

from broker.config import OssSettings
from broker.downloads import RESPONSE_OVERRIDES, response_overrides
from broker.errors import AccessDenied, RequestInvalid
from broker.names import POLICY_NAME_PATTERN
from broker.policies import Policy
from broker.scopes import BUCKET_PATTERN
from broker.signing import MAX_EXPIRES_SECONDS, OssEndpoint

__all__ = [
    "ADDITIONAL_HEADERS",
    "MAX_SINGLE_UPLOAD_BYTES",
    "OPERATIONS",
    "CallbackBody",
    "Expiry",
    "OperationSpec",
    "PostPolicyBody",
    "PresignBody",
    "callback_header",
    "check_content_type",
    "check_key",
    "check_part_size",
    "clamp_expiry",
    "key_under",
    "oss_endpoint",
    "presign_headers",
    "presign_query",
    "resolve_operation",
    "sub_resources",
    "valid_key",
    "wanted_validity",
]

Operation = Literal[
    "put_object",
    "get_object",
    "head_object",
    "delete_object",
    "initiate_multipart",
    "upload_part",
    "complete_multipart",
    "abort_multipart",
]
MAX_KEY_BYTES = 1023
MAX_SINGLE_UPLOAD_BYTES = 5 * 1024**3  # OSS's limit for one PutObject / PostObject
_MAX_METADATA_BYTES = 8 * 1024
_MIME = r"^[a-z0-9][a-z0-9!#$&^_.+-]{0,126}/[a-z0-9][a-z0-9!#$&^_.+-]{0,126}$"
_POLICY_NAME = f"^{POLICY_NAME_PATTERN}$"
_BUCKET = f"^{BUCKET_PATTERN}$"
_BUCKET_RULE = (
    "The bucket of the grant to sign under; needed only when the policy's grants name "
    "several buckets (400 BucketAmbiguous lists them), else that one bucket."
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_HEADER_VALUE = re.compile(r"^[\x20-\x7e]*$")


_CONTENT_FIELDS = frozenset({"content_type", "metadata", "storage_class", "headers"})
_FORBID_OVERWRITE = "x-oss-forbid-overwrite"
ADDITIONAL_HEADERS = ("content-length",)
"""Signed besides OSS's defaults when present (V4 ``x-oss-additional-headers``).

OSS signs a header named there like ``x-oss-*`` ones, and refuses a request
that lacks one it names (EC 0002-00000078, https://www.alibabacloud.com/help/en/oss/support/0002-00000078),
so a signed ``Content-Length`` binds the upload to exactly that many bytes.
"""


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """How an operation is sent to OSS, which policy action allows it, what it may carry."""

    method: str
    action: str
    fields: frozenset[str] = frozenset()
    needs_upload_id: bool = False
    needs_part_number: bool = False
    uploads_content: bool = False  # creates object content: Content-Type from the policy's list
    writes_object: bool = False  # may replace an object: x-oss-forbid-overwrite applies
    carries_bytes: bool = False  # the body is object bytes: Content-Length is bound


OPERATIONS: dict[str, OperationSpec] = {
    "put_object": OperationSpec(
        "PUT",
        "put",
        _CONTENT_FIELDS | {"content_md5", "callback", "content_length"},
        uploads_content=True,
        writes_object=True,
        carries_bytes=True,
    ),
    "get_object": OperationSpec("GET", "get", frozenset(RESPONSE_OVERRIDES)),
    "head_object": OperationSpec("HEAD", "get"),
    "delete_object": OperationSpec("DELETE", "delete"),
    # x-oss-forbid-overwrite is checked at Initiate (alibabacloud-oss-v2's
    # InitiateMultipartUploadRequest.forbid_overwrite) and again at Complete
    # (https://help.aliyun.com/en/oss/user-guide/0042-00000214): sign it on both.
    "initiate_multipart": OperationSpec(
        "POST", "multipart", _CONTENT_FIELDS, uploads_content=True, writes_object=True
    ),
    "upload_part": OperationSpec(
        "PUT",
        "multipart",
        frozenset({"content_md5", "content_length"}),
        needs_upload_id=True,
        needs_part_number=True,
        carries_bytes=True,
    ),
    # Browsers always label a POST body, so the XML part list's type may be signed too.
    "complete_multipart": OperationSpec(
        "POST",
        "multipart",
        frozenset({"callback", "headers", "content_type"}),
        needs_upload_id=True,
        writes_object=True,
    ),
    "abort_multipart": OperationSpec("DELETE", "multipart", needs_upload_id=True),
}
_OPTIONAL_FIELDS = (
    "content_type",
    "content_md5",
    "content_length",
    "metadata",
    "storage_class",
    "callback",
    "headers",
    *RESPONSE_OVERRIDES,
)
_DEFAULT_FOR_METHOD = {
    "PUT": "put_object",
    "GET": "get_object",
    "HEAD": "head_object",
    "DELETE": "delete_object",
}


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CallbackBody(_Body):
    """An upload callback; the URL must be one the policy file allows."""

    url: StrictStr = Field(max_length=1024)
    body: StrictStr = Field(max_length=4096)
    body_type: Literal["application/x-www-form-urlencoded", "application/json"] = (
        "application/x-www-form-urlencoded"
    )


class PresignBody(_Body):
    """``POST /v1/presign``."""

    policy: Annotated[StrictStr, Field(pattern=_POLICY_NAME)]
    bucket: Annotated[StrictStr, Field(pattern=_BUCKET, description=_BUCKET_RULE)] | None = None
    key: StrictStr = Field(min_length=1, max_length=MAX_KEY_BYTES)
    method: Literal["PUT", "GET", "HEAD", "POST", "DELETE"] | None = None
    operation: Operation | None = None
    expires_seconds: StrictInt | None = Field(default=None, ge=1, le=MAX_EXPIRES_SECONDS)
    content_type: Annotated[StrictStr, Field(pattern=_MIME)] | None = None
    content_md5: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9+/]{22}==$")] | None = None
    content_length: StrictInt | None = Field(
        default=None,
        ge=0,
        le=MAX_SINGLE_UPLOAD_BYTES,
        description="put_object, upload_part: the exact size in bytes, signed as Content-Length; "
        "required (and at most that) when the policy sets max_object_bytes.  With "
        "multipart_part_bytes P, part n takes at most min(P, max_object_bytes - (n - 1) * P).",
    )
    headers: dict[StrictStr, StrictStr] = Field(default_factory=dict, max_length=8)
    metadata: dict[StrictStr, StrictStr] = Field(default_factory=dict, max_length=32)
    storage_class: Literal["Standard", "IA", "Archive", "ColdArchive", "DeepColdArchive"] | None = (
        None
    )
    callback: CallbackBody | None = None
    upload_id: Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9._-]{1,128}$")] | None = None
    part_number: StrictInt | None = Field(default=None, ge=1, le=10000)
    response_content_disposition: StrictStr | None = Field(
        default=None,
        max_length=1100,
        description='get_object: inline or attachment, optionally ; filename="..." and/or '
        "; filename*=UTF-8''...; signed as response-content-disposition.",
    )
    response_content_type: StrictStr | None = Field(
        default=None,
        max_length=300,
        description="get_object: type/subtype, optionally ; charset=NAME; one of the policy's "
        "content_types when it lists any, never a page or script type otherwise.",
    )
    response_cache_control: StrictStr | None = Field(
        default=None,
        max_length=300,
        description="get_object: up to 8 directives (public, private, no-cache, no-store, "
        "no-transform, must-revalidate, proxy-revalidate, immutable, max-age=N, s-maxage=N, "
        "stale-while-revalidate=N, stale-if-error=N).",
    )


class PostPolicyBody(_Body):
    """``POST /v1/post-policy``."""

    policy: Annotated[StrictStr, Field(pattern=_POLICY_NAME)]
    bucket: Annotated[StrictStr, Field(pattern=_BUCKET, description=_BUCKET_RULE)] | None = None
    key_prefix: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_KEY_BYTES)
    key: StrictStr | None = Field(default=None, min_length=1, max_length=MAX_KEY_BYTES)
    expires_seconds: StrictInt | None = Field(default=None, ge=1, le=MAX_EXPIRES_SECONDS)
    content_type: Annotated[StrictStr, Field(pattern=_MIME)] | None = None
    max_object_bytes: StrictInt | None = Field(default=None, ge=1)
    success_action_status: Literal[200, 201, 204] | None = None
    signature_version: Literal["v4", "v1"] = "v4"
    callback: CallbackBody | None = None
    forbid_overwrite: StrictBool | None = Field(
        default=None,
        description="Pin x-oss-forbid-overwrite to true or false; default false, or true "
        "(and false refused) under a policy with forbid_overwrite.",
    )


def resolve_operation(method: str | None, operation: str | None) -> str:
    """The operation a presign body asks for; ``method`` alone picks put/get."""
    if operation is None:
        if method is None:
            return "put_object"
        if method not in _DEFAULT_FOR_METHOD:
            raise RequestInvalid(f"method {method} needs an explicit operation")
        return _DEFAULT_FOR_METHOD[method]
    if method is not None and OPERATIONS[operation].method != method:
        raise RequestInvalid(
            f"operation {operation} is sent with {OPERATIONS[operation].method}, not {method}"
        )
    return operation


def check_key(key: str, prefix: str) -> str:
    """A valid object key under ``prefix`` (``valid_key``), and not the prefix itself.

    Malformed keys are 400; a well-formed key outside the prefix is 403.
    """
    return key_under(valid_key(key), prefix)


def key_under(key: str, prefix: str) -> str:
    """``check_key`` for a key ``valid_key`` passed already: under ``prefix``, not it (403)."""
    if not key.startswith(prefix) or key == prefix:
        raise AccessDenied(f"key is outside this caller's prefix {prefix}", prefix=prefix)
    return key


def valid_key(key: str) -> str:
    """``key`` if it is 1..1023 UTF-8 bytes without traversal or controls; else 400."""
    try:
        size = len(key.encode("utf-8"))
    except UnicodeEncodeError as err:
        raise RequestInvalid("key must be valid UTF-8") from err
    if not 1 <= size <= MAX_KEY_BYTES:
        raise RequestInvalid(f"key must be 1 to {MAX_KEY_BYTES} bytes of UTF-8")
    if key.startswith("/") or "\\" in key or _CONTROL.search(key):
        raise RequestInvalid("key may not start with '/' or contain '\\' or control characters")
    if "." in key and ("/./" in f"/{key}/" or "/../" in f"/{key}/"):  # a "." or ".." segment
        raise RequestInvalid("key may not contain '.' or '..' segments")
    return key


def check_content_type(policy: Policy, content_type: str | None, *, required: bool) -> None:
    """Content-Type must be one the policy lists (and given, where it lists any)."""
    allowed = policy.content_types
    if not allowed:
        return
    if content_type is None:
        if required:
            raise RequestInvalid(f"content_type is required: one of {', '.join(allowed)}")
        return
    if content_type not in allowed:
        raise AccessDenied(f"content_type must be one of {', '.join(allowed)}")


def presign_headers(body: PresignBody, policy: Policy, operation: str) -> dict[str, str]:
    """The headers the uploader must send, all of them signed (``ADDITIONAL_HEADERS`` too)."""
    spec = OPERATIONS[operation]
    for name in _NOT_TAKEN[operation]:
        if _given(getattr(body, name)):
            raise RequestInvalid(f"{operation} does not take {name}")
    if spec.uploads_content:
        check_content_type(policy, body.content_type, required=True)
    headers: dict[str, str] = {}
    if body.content_type:
        headers["Content-Type"] = body.content_type
    if body.content_md5:
        headers["Content-MD5"] = body.content_md5
    if body.storage_class:
        headers["x-oss-storage-class"] = body.storage_class
    if body.headers:
        headers.update(_extra_headers(body.headers))
    if body.metadata:
        headers.update(_metadata_headers(body.metadata))
    if body.callback is not None:
        headers["x-oss-callback"] = callback_header(policy, body.callback)
    headers.update(_guard_headers(body, policy, spec))
    return headers


def presign_query(body: PresignBody, policy: Policy, operation: str) -> dict[str, str | None]:
    """The signed query: multipart sub-resources, or a GET's checked ``response-*``."""
    query = sub_resources(operation, body)
    if (  # response_overrides skips the fields not given: none given, nothing to do
        body.response_content_type is not None
        or body.response_content_disposition is not None
        or body.response_cache_control is not None
    ):
        overrides = {name: getattr(body, name) for name in RESPONSE_OVERRIDES}
        query.update(response_overrides(policy, overrides))
    return query


_NOT_TAKEN = {
    operation: tuple(name for name in _OPTIONAL_FIELDS if name not in spec.fields)
    for operation, spec in OPERATIONS.items()
}
"""Per operation, the optional body fields it refuses (in ``_OPTIONAL_FIELDS`` order)."""


def _given(value: object) -> bool:
    return value is not None and value != {}


def _guard_headers(body: PresignBody, policy: Policy, spec: OperationSpec) -> dict[str, str]:
    """The policy's upload guards as signed headers: forbid-overwrite, Content-Length."""
    guards: dict[str, str] = {}
    if spec.writes_object and policy.forbid_overwrite:
        if body.headers and _extra_headers(body.headers).get(_FORBID_OVERWRITE) == "false":
            raise AccessDenied(f"policy {policy.name} forbids overwriting objects")
        guards[_FORBID_OVERWRITE] = "true"
    if not spec.carries_bytes:
        return guards
    limit = policy.max_object_bytes
    if body.content_length is None:
        if limit is not None:
            raise RequestInvalid(
                f"content_length is required: policy {policy.name} limits objects to {limit} bytes"
            )
        return guards
    if limit is not None and body.content_length > limit:
        raise AccessDenied(f"content_length exceeds policy {policy.name}'s limit of {limit} bytes")
    if spec.needs_part_number and body.part_number is not None:
        check_part_size(policy, body.part_number, body.content_length)
    guards["Content-Length"] = str(body.content_length)
    return guards


def check_part_size(policy: Policy, number: int, size: int) -> None:
    """With ``multipart_part_bytes``, parts signed by the broker add up to ``max_object_bytes``.

    Part ``n`` may hold at most min(P, M - (n - 1) * P) bytes (P the part size,
    M the limit), so the parts 1..ceil(M / P) that can be signed at all hold at
    most M bytes together, and no URL is signed for a part past them.  Sound
    without any state: OSS keeps one part per number, a part uploaded again
    under its number replaces the old one (UploadPart,
    https://www.alibabacloud.com/help/en/oss/developer-reference/uploadpart;
    the emulator's ``oss_multipart.py`` too), and a presigned ``upload_part``
    URL cannot become UploadPartCopy: that needs an ``x-oss-copy-source``
    header, and V4 signs every ``x-oss-*`` header sent
    (alibabacloud_oss_v2/signer/v4.py ``_is_default_sign_header``).
    """
    part, limit = policy.multipart_part_bytes, policy.max_object_bytes
    if part is None or limit is None:
        return
    room = min(part, limit - (number - 1) * part)
    if room <= 0:
        last = math.ceil(limit / part)
        raise AccessDenied(
            f"part_number {number} is past policy {policy.name}'s last part, {last}: "
            f"objects of at most {limit} bytes in parts of {part} bytes"
        )
    if size > room:
        raise AccessDenied(
            f"content_length of part {number} may be at most {room} bytes under policy "
            f"{policy.name} (parts of {part} bytes, objects of at most {limit} bytes)"
        )


def _extra_headers(headers: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for name, value in headers.items():
        lowered = name.lower()
        if lowered != "x-oss-forbid-overwrite":
            raise RequestInvalid("headers may only set x-oss-forbid-overwrite")
        if value not in ("true", "false"):
            raise RequestInvalid("x-oss-forbid-overwrite must be 'true' or 'false'")
        out[lowered] = value
    return out


def _metadata_headers(metadata: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    total = 0
    for name, value in metadata.items():
        if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,63}", name):
            raise RequestInvalid("metadata names are 1-64 characters of a-z, 0-9 and '-'")
        if not _HEADER_VALUE.match(value) or len(value) > 1024:
            raise RequestInvalid("metadata values are printable ASCII, at most 1024 characters")
        total += len(name) + len(value)
        out[f"x-oss-meta-{name}"] = value
    if total > _MAX_METADATA_BYTES:
        raise RequestInvalid("metadata may not exceed 8 KiB in total")
    return out


def callback_header(policy: Policy, callback: CallbackBody) -> str:
    """``x-oss-callback``: base64 JSON, with a URL only from the policy's allowlist."""
    if callback.url not in policy.callback_urls:
        raise AccessDenied("callback url is not in this policy's callback_urls")
    if not _HEADER_VALUE.match(callback.body):
        raise RequestInvalid("callback body must be printable ASCII")
    document = {
        "callbackUrl": callback.url,
        "callbackBody": callback.body,
        "callbackBodyType": callback.body_type,
    }
    return base64.b64encode(json.dumps(document, separators=(",", ":")).encode()).decode()


@dataclass(frozen=True, slots=True)
class Expiry:
    """The lifetime a URL or form gets, and whether something shortened it."""

    seconds: int
    requested_seconds: int
    clamped: bool


def wanted_validity(requested: int | None, policy: Policy) -> int:
    """What the caller asks for: its request, or the policy's cap when it asks nothing."""
    cap = min(policy.max_url_expires_seconds, MAX_EXPIRES_SECONDS)
    return min(requested, cap) if requested is not None else cap


def clamp_expiry(requested: int | None, policy: Policy, token_remaining: float) -> Expiry:
    """min(requested, policy cap, 7 days, what the token has left); ``clamped`` if shortened."""
    asked = requested if requested is not None else policy.max_url_expires_seconds
    asked = min(asked, MAX_EXPIRES_SECONDS)
    seconds = min(wanted_validity(requested, policy), math.floor(token_remaining))
    if seconds < 1:
        raise RequestInvalid("the credentials have no validity left to sign with")
    return Expiry(seconds=seconds, requested_seconds=asked, clamped=seconds < asked)


def oss_endpoint(settings: OssSettings, policy: Policy) -> OssEndpoint:
    """Where URLs for ``policy`` point: the configured override, or the policy's endpoint."""
    return _endpoint(settings, policy.oss_endpoint)


@functools.lru_cache(maxsize=256)
def _endpoint(settings: OssSettings, policy_endpoint: str) -> OssEndpoint:
    # Built (and validated) once per distinct endpoint, not once per request.
    scheme, host = settings.scheme_and_host(policy_endpoint)
    return OssEndpoint(host=host, scheme=scheme, addressing=settings.addressing)


def sub_resources(operation: str, body: PresignBody) -> dict[str, str | None]:
    """The query sub-resources of a multipart operation (``uploads``, ``uploadId``...)."""
    spec = OPERATIONS[operation]
    if spec.needs_upload_id != (body.upload_id is not None):
        raise RequestInvalid(
            f"{operation} {'needs' if spec.needs_upload_id else 'does not take'} upload_id"
        )
    if spec.needs_part_number != (body.part_number is not None):
        raise RequestInvalid(
            f"{operation} {'needs' if spec.needs_part_number else 'does not take'} part_number"
        )
    if operation == "initiate_multipart":
        return {"uploads": None}
    query: dict[str, str | None] = {}
    if body.part_number is not None:
        query["partNumber"] = str(body.part_number)
    if body.upload_id is not None:
        query["uploadId"] = body.upload_id
    return query
