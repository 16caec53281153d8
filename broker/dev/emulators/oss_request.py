"""What an OSS request addresses and which API it calls, read as OSS reads it.

Addressing: virtual-host (``Host: <bucket>.<anything>`` for a known bucket),
path style (``/<bucket>/<key>``), and absolute-form targets (the client uses
the emulator as its HTTP proxy).  The API follows from the method, whether a
key is named, and the sub-resources in the query (``oss_signature_v1.SUBRESOURCES``:
the parameters OSS treats as selecting an API or feature).  An API or
sub-resource the emulator does not implement is answered with OSS's 501
``NotImplemented`` error, never 405.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

from aiohttp import web

from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.oss_signature import SignedRequest
from broker.dev.emulators.oss_signature_v1 import SUBRESOURCES

__all__ = [
    "ACTIONS",
    "RESPONSE_OVERRIDES",
    "Exchange",
    "check_content_md5",
    "check_key",
    "operation_of",
    "parse_target",
    "read_body",
    "signed_request",
]

RESPONSE_OVERRIDES: Final[Mapping[str, str]] = {
    "response-cache-control": "Cache-Control",
    "response-content-disposition": "Content-Disposition",
    "response-content-encoding": "Content-Encoding",
    "response-content-language": "Content-Language",
    "response-content-type": "Content-Type",
    "response-expires": "Expires",
}
"""GetObject's response-header overrides (query parameter -> response header)."""

# Sub-resources the emulated APIs take (the rest select APIs it does not emulate).
_HANDLED: Final = frozenset(
    {"security-token", "uploads", "uploadId", "partNumber", "continuation-token", "objectMeta"}
) | frozenset(RESPONSE_OVERRIDES)
# (method, what the request names) -> (OSS API, RAM action it needs).  InitiateMultipartUpload,
# UploadPart and CompleteMultipartUpload are authorized by oss:PutObject; both ListObjects
# versions by oss:ListObjects (OSS "RAM Policy" page, Action element).
_OPERATIONS: Final[Mapping[tuple[str, str], tuple[str, str]]] = {
    ("PUT", "object"): ("PutObject", "oss:PutObject"),
    ("GET", "object"): ("GetObject", "oss:GetObject"),
    ("HEAD", "object"): ("HeadObject", "oss:GetObject"),
    # GetObjectMeta: HEAD /ObjectName?objectMeta, oss:GetObject; what oss2's object_exists and
    # alibabacloud-oss-v2's is_object_exist send (https://help.aliyun.com/document_detail/31985.html)
    ("HEAD", "objectMeta"): ("GetObjectMeta", "oss:GetObject"),
    ("DELETE", "object"): ("DeleteObject", "oss:DeleteObject"),
    ("POST", "bucket"): ("PostObject", "oss:PutObject"),
    ("GET", "bucket"): ("ListObjects", "oss:ListObjects"),
    ("POST", "uploads"): ("InitiateMultipartUpload", "oss:PutObject"),
    ("PUT", "upload"): ("UploadPart", "oss:PutObject"),
    ("GET", "upload"): ("ListParts", "oss:ListParts"),
    ("POST", "upload"): ("CompleteMultipartUpload", "oss:PutObject"),
    ("DELETE", "upload"): ("AbortMultipartUpload", "oss:AbortMultipartUpload"),
}
ACTIONS: Final = {**dict(_OPERATIONS.values()), "ListObjectsV2": "oss:ListObjects"}


@dataclass
class Exchange:
    """What is known about the request so far (for the record)."""

    bucket: str | None = None
    key: str | None = None
    operation: str = "Unknown"
    query: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> str | None:
        """A query parameter's (first) value, or None."""
        return next((value for key, value in self.query if key == name), None)

    def params(self) -> dict[str, str]:
        """The query parameters by name (first value wins)."""
        found: dict[str, str] = {}
        for name, value in self.query:
            found.setdefault(name, value)
        return found


def parse_target(request: web.Request, buckets: frozenset[str], exchange: Exchange) -> None:
    """Bucket, key and query from Host and the raw request target (never normalised)."""
    raw = request.raw_path
    if not raw.startswith("/"):
        slash = raw.find("/", raw.find("://") + 3) if "://" in raw else -1
        raw = raw[slash:] if slash >= 0 else "/"
    path, _, query = raw.partition("?")
    host = request.headers.get("Host", "")
    hostname = "" if host.startswith("[") else host.rsplit(":", 1)[0]
    label, dot, _ = hostname.partition(".")
    if dot and label in buckets:
        exchange.bucket, raw_key = label, path[1:]
    else:
        first, _, raw_key = path[1:].partition("/")
        exchange.bucket = _unquote(first) or None
    exchange.key = _unquote(raw_key) or None
    pairs = (pair.partition("=") for pair in query.split("&") if pair)
    exchange.query = tuple((_unquote(name), _unquote(value)) for name, _, value in pairs)


def _unquote(text: str) -> str:
    try:
        return unquote(text, errors="strict")
    except UnicodeDecodeError:
        raise OssError("InvalidArgument", "The request URI is not valid UTF-8.") from None


def operation_of(method: str, exchange: Exchange) -> str:
    """The OSS API a request calls, from its method, target and sub-resources."""
    names = {name for name, _ in exchange.query}
    unhandled = sorted((names & SUBRESOURCES) - _HANDLED)
    if unhandled:
        raise OssError("NotImplemented", f"Not emulated: the {', '.join(unhandled)} sub-resource.")
    if method == "OPTIONS":
        return "PreflightCors"
    resource = "upload" if "uploadId" in names else "uploads" if "uploads" in names else "object"
    if resource == "object" and "objectMeta" in names:
        resource = "objectMeta"
    if exchange.key is None:
        resource = "bucket" if resource == "object" else f"bucket-{resource}"
    operation = _OPERATIONS.get((method, resource))
    if exchange.bucket is None or operation is None:
        raise OssError("NotImplemented", f"Not emulated: {method} on this resource.")
    if operation[0] == "ListObjects" and exchange.param("list-type") is not None:
        if exchange.param("list-type") != "2":
            raise OssError("InvalidArgument", "list-type must be 2.")
        return "ListObjectsV2"
    return operation[0]


def check_key(key: str) -> None:
    """OSS's object-name rules, and for disk storage no empty, ``.`` or ``..`` segments."""
    encoded = key.encode("utf-8", "surrogatepass")
    unsafe = any(segment in {"", ".", ".."} for segment in key.split("/"))
    if not 0 < len(encoded) <= 1023 or key[0] in "/\\" or unsafe or "\\" in key or "\x00" in key:
        raise OssError("InvalidObjectName", details={"ObjectName": key})


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, at most ``limit`` bytes (``EntityTooLarge`` past it)."""
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise OssError("EntityTooLarge") from None
    if len(body) > limit:
        raise OssError("EntityTooLarge")
    return body


def check_content_md5(request: web.Request, body: bytes) -> None:
    """A ``Content-MD5`` header must be valid base64 of the body's MD5."""
    declared = request.headers.get("Content-MD5")
    if declared is None:
        return
    try:
        digest = base64.b64decode(declared, validate=True)
    except binascii.Error:
        raise OssError("InvalidDigest") from None
    if len(digest) != 16:
        raise OssError("InvalidDigest")
    if digest != hashlib.md5(body).digest():  # noqa: S324 - Content-MD5 is MD5 by definition
        raise OssError("BadDigest")


def signed_request(request: web.Request, exchange: Exchange, body: bytes) -> SignedRequest:
    """The request as the signature checks see it: lower-case header names, decoded query."""
    headers = {name.lower(): ",".join(request.headers.getall(name)) for name in request.headers}
    return SignedRequest(
        request.method, exchange.bucket, exchange.key, exchange.query, headers, body
    )
