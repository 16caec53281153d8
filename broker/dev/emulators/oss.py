"""An OSS emulator: uploads by presigned URL, PostObject and multipart, checked as OSS does.

It answers the official ``alibabacloud-oss-v2`` SDK and browsers over real HTTP:
PutObject, GetObject, HeadObject, DeleteObject, multipart (Initiate,
UploadPart, Complete, Abort, ListParts), PostObject forms and CORS.  Every
request is authenticated by ``oss_signature`` (``oss_post`` for forms) against
tokens the STS emulator issued, and authorized against the token's inline RAM
policy (``oss_ram``).  Objects live on disk (``oss_store``); multipart uploads
in ``oss_multipart``.  Errors are OSS's XML (``Code``, ``Message``,
``RequestId``, ``HostId``, extra elements, ``EC``) with ``x-oss-request-id``;
``oss_errors`` lists where each code and message comes from.

Addressing: virtual-host (``Host: <bucket>.<anything>`` for a known bucket),
path style (``/<bucket>/<key>``), and absolute-form targets, so an SDK can keep
its ``oss-<region>.aliyuncs.com`` endpoint and use the emulator as HTTP proxy.
Stricter than OSS, on purpose: keys with empty, ``.`` or ``..`` segments are
refused (they cannot be stored safely on disk); with ``strict_post_fields`` a
PostObject field the policy does not name is refused (S3's rule; OSS's own
sample form leaves ``key`` uncovered, so pass False to behave like OSS).
"""

from __future__ import annotations

import base64
import binascii
import fnmatch
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Final
from urllib.parse import unquote

from aiohttp import web

from broker.dev.emulators import serve_app
from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.oss_multipart import MultipartUploads, PartTarget
from broker.dev.emulators.oss_post import authenticate_post, post_response, read_form
from broker.dev.emulators.oss_ram import authorize
from broker.dev.emulators.oss_signature import SignedRequest, Verifier, authenticate
from broker.dev.emulators.oss_store import DEFAULT_TYPE, ObjectStore, StoredObject
from broker.dev.emulators.oss_xml import error_response
from broker.dev.emulators.sts import StsEmulator
from broker.models import Clock, system_clock

__all__ = ["OssEmulator", "RecordedOssRequest", "start_oss_emulator"]

_FORM_OVERHEAD_BYTES: Final = 1024 * 1024
_CORS_METHODS: Final = ("GET", "PUT", "POST", "DELETE", "HEAD")
_EXPOSED: Final = "ETag, x-oss-request-id"
_UNSUPPORTED: Final = frozenset(
    {"acl", "append", "tagging", "symlink", "restore", "delete", "versionId", "x-oss-process"}
)
# (method, what the query names) -> (OSS API, RAM action it needs)
_OPERATIONS: Final[Mapping[tuple[str, str], tuple[str, str]]] = {
    ("PUT", "object"): ("PutObject", "oss:PutObject"),
    ("GET", "object"): ("GetObject", "oss:GetObject"),
    ("HEAD", "object"): ("HeadObject", "oss:GetObject"),
    ("DELETE", "object"): ("DeleteObject", "oss:DeleteObject"),
    ("POST", "bucket"): ("PostObject", "oss:PutObject"),
    ("POST", "uploads"): ("InitiateMultipartUpload", "oss:PutObject"),
    ("PUT", "upload"): ("UploadPart", "oss:PutObject"),
    ("GET", "upload"): ("ListParts", "oss:ListParts"),
    ("POST", "upload"): ("CompleteMultipartUpload", "oss:PutObject"),
    ("DELETE", "upload"): ("AbortMultipartUpload", "oss:AbortMultipartUpload"),
}
_ACTIONS: Final = dict(_OPERATIONS.values())


@dataclass(frozen=True)
class RecordedOssRequest:
    """One request as the emulator saw it, and how it answered."""

    method: str
    bucket: str | None
    key: str | None
    operation: str
    status: int
    error_code: str | None


@dataclass
class _Exchange:
    """What is known about the request so far (for the record)."""

    bucket: str | None = None
    key: str | None = None
    operation: str = "Unknown"
    query: tuple[tuple[str, str], ...] = ()

    def param(self, name: str) -> str | None:
        return next((value for key, value in self.query if key == name), None)


class OssEmulator:
    """OSS for one region: buckets on disk, signatures and policies checked."""

    def __init__(
        self,
        *,
        sts: StsEmulator,
        storage_dir: Path,
        clock: Clock = system_clock,
        region: str = "cn-hangzhou",
        buckets: Iterable[str] = ("examplebucket",),
        cors_allow_origins: Iterable[str] = ("*",),
        max_skew_seconds: float = 900.0,
        max_object_bytes: int = 64 * 1024 * 1024,
        strict_post_fields: bool = True,
    ) -> None:
        self._verifier = Verifier(sts, clock, region, max_skew_seconds)
        self._store = ObjectStore(storage_dir, clock)
        self._multipart = MultipartUploads(self._store)
        self._region = region
        self._buckets = frozenset(buckets)
        self._origins = tuple(cors_allow_origins)
        self._max_object_bytes = max_object_bytes
        self._strict_post_fields = strict_post_fields
        self.requests: list[RecordedOssRequest] = []

    def make_app(self) -> web.Application:
        """The aiohttp application; one catch-all route, as OSS routes by host and query."""
        app = web.Application(client_max_size=self._max_object_bytes + _FORM_OVERHEAD_BYTES)
        app[_EMULATOR] = self
        app.router.add_route("*", "/{tail:.*}", _handle)
        return app

    def read_object(self, bucket: str, key: str) -> bytes | None:
        """An object's bytes as stored, or None."""
        if self._store.get(bucket, key) is None:
            return None
        return self._store.read(bucket, key)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        """Answer one request; OSS-style XML for every error."""
        request_id = uuid.uuid4().hex[:24].upper()
        exchange = _Exchange()
        error: OssError | None = None
        try:
            response = await self._dispatch(request, exchange)
        except OssError as err:
            error = err
            response = error_response(request, err, request_id)
        response.headers["x-oss-request-id"] = request_id
        self._add_cors(request, response)
        code = error.code if error else None
        record = (exchange.bucket, exchange.key, exchange.operation, response.status, code)
        self.requests.append(RecordedOssRequest(request.method, *record))
        return response

    async def _dispatch(self, request: web.Request, exchange: _Exchange) -> web.StreamResponse:
        _parse_target(request, self._buckets, exchange)
        exchange.operation = _operation(request.method, exchange)
        if exchange.bucket not in self._buckets:
            raise OssError("NoSuchBucket", details={"BucketName": exchange.bucket or ""})
        if exchange.operation == "PreflightCors":
            return self._preflight(request)
        if exchange.operation == "PostObject":
            return await self._post_object(request, exchange)
        if exchange.key is not None:
            _check_key(exchange.key)
        body = await _read_body(request, self._max_object_bytes)
        _check_content_md5(request, body)
        issued = authenticate(_signed_request(request, exchange, body), self._verifier)
        action = _ACTIONS[exchange.operation]
        authorize(issued, action, exchange.bucket or "", exchange.key, self._region)
        return self._operate(request, exchange, body)

    def _operate(self, request: web.Request, exchange: _Exchange, body: bytes) -> web.Response:
        bucket, key, operation = exchange.bucket or "", exchange.key or "", exchange.operation
        if operation == "PutObject":
            self._store.check_overwrite(request.headers, bucket, key)
            stored = self._store.put(bucket, key, body, request.headers, "Normal")
            return web.Response(headers=_put_headers(stored, body))
        if operation in {"GetObject", "HeadObject"}:
            return self._get_object(bucket, key)
        if operation == "DeleteObject":
            self._store.delete(bucket, key)
            return web.Response(status=204)
        target = PartTarget(bucket, key, exchange.param("uploadId"), exchange.param("partNumber"))
        return self._multipart.answer(request, operation, target, body)

    async def _post_object(self, request: web.Request, exchange: _Exchange) -> web.Response:
        form, content = await read_form(request, self._max_object_bytes)
        raw_key = form.fields.get("key")
        if not raw_key:
            raise OssError("InvalidArgument", "Bucket POST must contain a field named 'key'.")
        bucket = exchange.bucket or ""
        strict = self._strict_post_fields
        issued = authenticate_post(form, bucket, self._verifier, strict_fields=strict)
        exchange.key = key = raw_key.replace("${filename}", form.file_name)
        _check_key(key)
        authorize(issued, "oss:PutObject", bucket, key, self._region)
        self._store.check_overwrite(form.fields, bucket, key)
        headers = {**form.fields, "content-type": form.content_type or DEFAULT_TYPE}
        stored = self._store.put(bucket, key, content, headers, "Normal")
        return post_response(form.fields.get("success_action_status"), bucket, key, stored.etag)

    def _get_object(self, bucket: str, key: str) -> web.Response:
        stored = self._store.get(bucket, key)
        if stored is None:
            raise OssError("NoSuchKey", ec="0026-00000001", details={"Key": key})
        headers = {
            "Content-Type": stored.content_type,
            "ETag": stored.etag,
            "Last-Modified": formatdate(stored.last_modified, usegmt=True),
            "x-oss-object-type": stored.object_type,
            "x-oss-storage-class": "Standard",
            **stored.metadata,
        }
        return web.Response(body=self._store.read(bucket, key), headers=headers)

    def _preflight(self, request: web.Request) -> web.Response:
        origin = request.headers.get("Origin", "")
        method = request.headers.get("Access-Control-Request-Method", "")
        if not self._origin_allowed(origin) or method not in _CORS_METHODS:
            raise OssError("AccessForbidden")
        headers = {"Access-Control-Max-Age": "600"}
        requested = request.headers.get("Access-Control-Request-Headers")
        if requested:
            headers["Access-Control-Allow-Headers"] = requested
        return web.Response(headers=headers)

    def _add_cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin", "")
        if not self._origin_allowed(origin):
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Methods"] = ", ".join(_CORS_METHODS)
        response.headers["Access-Control-Expose-Headers"] = _EXPOSED
        response.headers["Vary"] = "Origin"

    def _origin_allowed(self, origin: str) -> bool:
        if not origin:
            return False
        return any(fnmatch.fnmatchcase(origin, pattern) for pattern in self._origins)


_EMULATOR: Final = web.AppKey("oss_emulator", OssEmulator)


async def _handle(request: web.Request) -> web.StreamResponse:
    return await request.app[_EMULATOR].answer(request)


def _parse_target(request: web.Request, buckets: frozenset[str], exchange: _Exchange) -> None:
    """Bucket, key and query from Host and the raw request target (never normalised)."""
    raw = request.raw_path
    if not raw.startswith("/"):
        # An absolute-form target: the client uses the emulator as its HTTP proxy.
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


def _operation(method: str, exchange: _Exchange) -> str:
    """The OSS API a request calls, from its method, target and sub-resources."""
    names = {name for name, _ in exchange.query}
    if names & _UNSUPPORTED:
        raise OssError("NotImplemented", f"Not emulated: {sorted(names & _UNSUPPORTED)}.")
    if method == "OPTIONS":
        return "PreflightCors"
    resource = "upload" if "uploadId" in names else "uploads" if "uploads" in names else "object"
    if exchange.key is None:
        resource = "bucket" if resource == "object" else resource
    operation = _OPERATIONS.get((method, resource))
    if exchange.bucket is None or operation is None:
        raise OssError("MethodNotAllowed")
    return operation[0]


def _check_key(key: str) -> None:
    """OSS's object-name rules, and for disk storage no empty, ``.`` or ``..`` segments."""
    encoded = key.encode("utf-8", "surrogatepass")
    unsafe = any(segment in {"", ".", ".."} for segment in key.split("/"))
    if not 0 < len(encoded) <= 1023 or key[0] in "/\\" or unsafe or "\\" in key or "\x00" in key:
        raise OssError("InvalidObjectName", details={"ObjectName": key})


async def _read_body(request: web.Request, limit: int) -> bytes:
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise OssError("EntityTooLarge") from None
    if len(body) > limit:
        raise OssError("EntityTooLarge")
    return body


def _check_content_md5(request: web.Request, body: bytes) -> None:
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


def _signed_request(request: web.Request, exchange: _Exchange, body: bytes) -> SignedRequest:
    headers = {name.lower(): ",".join(request.headers.getall(name)) for name in request.headers}
    return SignedRequest(
        request.method, exchange.bucket, exchange.key, exchange.query, headers, body
    )


def _put_headers(stored: StoredObject, body: bytes) -> dict[str, str]:
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324
    return {"ETag": stored.etag, "Content-MD5": md5}


async def start_oss_emulator(
    emulator: OssEmulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the emulator on ``host:port`` (0 picks a free port); returns runner and base URL."""
    return await serve_app(emulator.make_app(), host, port)
