"""An OSS emulator: uploads by presigned URL, PostObject and multipart, checked as OSS does.

It answers the official ``alibabacloud-oss-v2`` SDK and browsers over real HTTP:
PutObject, GetObject, HeadObject, DeleteObject, multipart (Initiate,
UploadPart, Complete, Abort, ListParts), PostObject forms and CORS.  Every
request is authenticated by ``oss_signature`` against tokens the STS emulator
issued, and authorized against the token's inline RAM policy.  Objects live
on disk under ``storage_dir/<bucket>/<key>``; Content-Type and
``x-oss-meta-*`` stay in memory.  Errors are OSS's XML (``Code``, ``Message``,
``RequestId``, ``HostId``, extra elements, ``EC``) with ``x-oss-request-id``;
``oss_signature`` lists where each code and message comes from.

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
import os
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formatdate
from pathlib import Path
from typing import Final, TypeAlias
from urllib.parse import quote, unquote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from broker.dev.emulators import serve_app
from broker.dev.emulators.oss_signature import (
    OssError,
    PostForm,
    SignedRequest,
    Verifier,
    authenticate,
    authenticate_post,
    authorize,
)
from broker.dev.emulators.sts import StsEmulator
from broker.models import Clock, system_clock

__all__ = ["OssEmulator", "RecordedOssRequest", "start_oss_emulator"]

_MIN_PART_BYTES: Final = 100 * 1024
_MAX_PART_NUMBER: Final = 10_000
_MAX_FIELD_BYTES: Final = 64 * 1024
_FORM_OVERHEAD_BYTES: Final = 1024 * 1024
_DEFAULT_TYPE: Final = "application/octet-stream"
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

_Node: TypeAlias = tuple[str, "str | Sequence[_Node]"]


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


@dataclass(frozen=True)
class _Stored:
    etag: str
    content_type: str
    metadata: Mapping[str, str]
    last_modified: float
    size: int
    object_type: str


@dataclass
class _Upload:
    bucket: str
    key: str
    content_type: str
    metadata: Mapping[str, str]
    parts: dict[int, tuple[str, bytes]] = field(default_factory=dict)


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
        self._storage_dir = Path(storage_dir)
        self._clock = clock
        self._region = region
        self._buckets = frozenset(buckets)
        self._origins = tuple(cors_allow_origins)
        self._max_object_bytes = max_object_bytes
        self._strict_post_fields = strict_post_fields
        self._objects: dict[tuple[str, str], _Stored] = {}
        self._uploads: dict[str, _Upload] = {}
        self.requests: list[RecordedOssRequest] = []

    def make_app(self) -> web.Application:
        """The aiohttp application; one catch-all route, as OSS routes by host and query."""
        app = web.Application(client_max_size=self._max_object_bytes + _FORM_OVERHEAD_BYTES)
        app[_EMULATOR] = self
        app.router.add_route("*", "/{tail:.*}", _handle)
        return app

    def read_object(self, bucket: str, key: str) -> bytes | None:
        """An object's bytes as stored, or None."""
        if (bucket, key) not in self._objects:
            return None
        return self._object_path(bucket, key).read_bytes()

    async def answer(self, request: web.Request) -> web.StreamResponse:
        """Answer one request; OSS-style XML for every error."""
        request_id = uuid.uuid4().hex[:24].upper()
        exchange = _Exchange()
        error: OssError | None = None
        try:
            response = await self._dispatch(request, exchange)
        except OssError as err:
            error = err
            response = _error_response(request, err, request_id)
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
        return await self._operate(request, exchange, body)

    async def _operate(
        self, request: web.Request, exchange: _Exchange, body: bytes
    ) -> web.StreamResponse:
        bucket, key, operation = exchange.bucket or "", exchange.key or "", exchange.operation
        if operation == "PutObject":
            self._check_overwrite(request.headers, bucket, key)
            stored = self._store(bucket, key, body, request.headers, "Normal")
            return web.Response(headers=_put_headers(stored, body))
        if operation in {"GetObject", "HeadObject"}:
            return self._get_object(bucket, key)
        if operation == "DeleteObject":
            self._delete(bucket, key)
            return web.Response(status=204)
        return await self._multipart(request, exchange, body)

    async def _multipart(
        self, request: web.Request, exchange: _Exchange, body: bytes
    ) -> web.StreamResponse:
        bucket, key, operation = exchange.bucket or "", exchange.key or "", exchange.operation
        if operation == "InitiateMultipartUpload":
            self._check_overwrite(request.headers, bucket, key)
            upload_id = uuid.uuid4().hex.upper()
            content_type = request.headers.get("Content-Type") or _DEFAULT_TYPE
            meta = _metadata(request.headers.items())
            self._uploads[upload_id] = _Upload(bucket, key, content_type, meta)
            nodes = [("Bucket", bucket), ("Key", key), ("UploadId", upload_id)]
            return _xml_response("InitiateMultipartUploadResult", nodes)
        upload_id = exchange.param("uploadId") or ""
        upload = self._upload(upload_id, bucket, key)
        if operation == "UploadPart":
            etag = _etag(body)
            upload.parts[_part_number(exchange.param("partNumber"))] = (etag, body)
            return web.Response(headers={"ETag": etag})
        if operation == "AbortMultipartUpload":
            del self._uploads[upload_id]
            return web.Response(status=204)
        if operation == "ListParts":
            return _list_parts(upload, upload_id)
        return self._complete(request, upload_id, upload, body)

    def _complete(
        self, request: web.Request, upload_id: str, upload: _Upload, body: bytes
    ) -> web.Response:
        if request.headers.get("x-oss-complete-all", "").lower() == "yes":
            listed = [(number, upload.parts[number][0]) for number in sorted(upload.parts)]
        else:
            listed = _parse_complete(body)
        chosen = _chosen_parts(upload, listed)
        self._check_overwrite(request.headers, upload.bucket, upload.key)
        digest = hashlib.md5(b"".join(hashlib.md5(part).digest() for part in chosen))  # noqa: S324
        etag = f'"{digest.hexdigest().upper()}-{len(chosen)}"'
        headers = {"Content-Type": upload.content_type, **upload.metadata}
        self._store(upload.bucket, upload.key, b"".join(chosen), headers, "Multipart", etag)
        del self._uploads[upload_id]
        location = f"http://{request.host}/{upload.bucket}/{quote(upload.key)}"
        nodes = [("Location", location), ("Bucket", upload.bucket), ("Key", upload.key)]
        return _xml_response("CompleteMultipartUploadResult", [*nodes, ("ETag", etag)])

    async def _post_object(self, request: web.Request, exchange: _Exchange) -> web.Response:
        form, content = await _read_form(request, self._max_object_bytes)
        raw_key = form.fields.get("key")
        if not raw_key:
            raise OssError("InvalidArgument", "Bucket POST must contain a field named 'key'.")
        bucket = exchange.bucket or ""
        strict = self._strict_post_fields
        issued = authenticate_post(form, bucket, self._verifier, strict_fields=strict)
        exchange.key = key = raw_key.replace("${filename}", form.file_name)
        _check_key(key)
        authorize(issued, "oss:PutObject", bucket, key, self._region)
        self._check_overwrite(form.fields, bucket, key)
        headers = {**form.fields, "content-type": form.content_type or _DEFAULT_TYPE}
        stored = self._store(bucket, key, content, headers, "Normal")
        return _post_response(form.fields.get("success_action_status"), bucket, key, stored)

    def _get_object(self, bucket: str, key: str) -> web.Response:
        stored = self._objects.get((bucket, key))
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
        return web.Response(body=self._object_path(bucket, key).read_bytes(), headers=headers)

    def _upload(self, upload_id: str, bucket: str, key: str) -> _Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or (upload.bucket, upload.key) != (bucket, key):
            raise OssError("NoSuchUpload", details={"UploadId": upload_id})
        return upload

    def _check_overwrite(self, headers: Mapping[str, str], bucket: str, key: str) -> None:
        forbid = next((v for k, v in headers.items() if k.lower() == "x-oss-forbid-overwrite"), "")
        if forbid.lower() == "true" and (bucket, key) in self._objects:
            raise OssError("FileAlreadyExists", ec="0026-00000003")

    def _store(
        self,
        bucket: str,
        key: str,
        data: bytes,
        headers: Mapping[str, str],
        object_type: str,
        etag: str | None = None,
    ) -> _Stored:
        content_type = next(
            (v for k, v in headers.items() if k.lower() == "content-type"), _DEFAULT_TYPE
        )
        metadata = _metadata(headers.items())
        for value in (content_type, *metadata.values()):
            _check_header_value(value)
        _write_atomically(self._object_path(bucket, key), data)
        stored = _Stored(
            etag or _etag(data), content_type, metadata, self._clock(), len(data), object_type
        )
        self._objects[(bucket, key)] = stored
        return stored

    def _delete(self, bucket: str, key: str) -> None:
        if self._objects.pop((bucket, key), None) is None:
            return
        path = self._object_path(bucket, key)
        path.unlink(missing_ok=True)
        top = (self._storage_dir / bucket).resolve()
        for parent in path.parents:
            if parent == top or any(parent.iterdir()):
                break
            parent.rmdir()

    def _object_path(self, bucket: str, key: str) -> Path:
        """``storage_dir/<bucket>/<key>``, refused if it would leave the bucket's directory."""
        base = (self._storage_dir / bucket).resolve()
        path = (base / key).resolve()
        if path == base or not path.is_relative_to(base):
            raise OssError("InvalidObjectName")
        return path

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


def _check_header_value(value: str) -> None:
    if not value.isascii() or not value.isprintable():
        raise OssError(
            "InvalidArgument", "Content-Type and x-oss-meta-* values must be printable ASCII."
        )


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


async def _read_form(request: web.Request, limit: int) -> tuple[PostForm, bytes]:
    """The form's fields (lower-case names) and file; ``file`` must come last."""
    if request.content_type != "multipart/form-data":
        raise OssError("MalformedPOSTRequest")
    fields: dict[str, str] = {}
    file: tuple[str, str | None, bytes] | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if file is not None or not isinstance(part, BodyPartReader):
                raise OssError(
                    "MalformedPOSTRequest", "The file form field must be the last field."
                )
            name = (part.name or "").lower()
            if name == "file":
                content = await _read_part(part, limit)
                file = (part.filename or "", part.headers.get("Content-Type"), content)
            elif name in fields or not name:
                raise OssError(
                    "MalformedPOSTRequest", f"Form field {name!r} is repeated or unnamed."
                )
            else:
                fields[name] = (await _read_part(part, _MAX_FIELD_BYTES)).decode("utf-8")
    except (ValueError, AssertionError, UnicodeDecodeError, HttpProcessingError):
        raise OssError("MalformedPOSTRequest") from None
    if file is None:
        raise OssError("InvalidArgument", "Bucket POST must contain a field named 'file'.")
    return PostForm(fields, file[0], file[1], len(file[2])), file[2]


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise OssError("EntityTooLarge")
        chunks.append(chunk)
    return b"".join(chunks)


def _post_response(status: str | None, bucket: str, key: str, stored: _Stored) -> web.Response:
    """``success_action_status``: 200 and 201 (with PostResponse XML); anything else 204."""
    headers = {"ETag": stored.etag}
    if status == "200":
        return web.Response(status=200, headers=headers)
    if status == "201":
        nodes = [("Bucket", bucket), ("Location", f"/{bucket}/{quote(key)}"), ("Key", key)]
        return _xml_response("PostResponse", [*nodes, ("ETag", stored.etag)], 201, headers)
    return web.Response(status=204, headers=headers)


def _parse_complete(body: bytes) -> list[tuple[int, str]]:
    """The ``<CompleteMultipartUpload>`` part list; no DTDs accepted."""
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise OssError("MalformedXML")
    try:
        root = ET.fromstring(body)  # noqa: S314 - DTDs refused above; body size is capped
    except ET.ParseError:
        raise OssError("MalformedXML") from None
    if root.tag != "CompleteMultipartUpload":
        raise OssError("MalformedXML")
    listed = []
    for part in root.findall("Part"):
        number, etag = part.findtext("PartNumber", ""), part.findtext("ETag", "")
        if not number.strip().isdigit() or not etag:
            raise OssError("MalformedXML")
        listed.append((int(number), etag.strip()))
    return listed


def _chosen_parts(upload: _Upload, listed: list[tuple[int, str]]) -> list[bytes]:
    """The listed parts' bytes: ascending, present, ETags matching, all but the last ≥ 100 KB."""
    if not listed:
        raise OssError("MalformedXML")
    numbers = [number for number, _ in listed]
    if numbers != sorted(set(numbers)):
        raise OssError("InvalidPartOrder")
    chosen = []
    for number, etag in listed:
        stored = upload.parts.get(number)
        if stored is None or stored[0].strip('"').upper() != etag.strip('"').upper():
            raise OssError("InvalidPart", details={"PartNumber": str(number)})
        chosen.append(stored[1])
    if any(len(part) < _MIN_PART_BYTES for part in chosen[:-1]):
        raise OssError("EntityTooSmall")
    return chosen


def _list_parts(upload: _Upload, upload_id: str) -> web.Response:
    nodes: list[_Node] = [("Bucket", upload.bucket), ("Key", upload.key), ("UploadId", upload_id)]
    nodes += [("MaxParts", "1000"), ("IsTruncated", "false")]
    for number in sorted(upload.parts):
        etag, data = upload.parts[number]
        part = [("PartNumber", str(number)), ("ETag", etag), ("Size", str(len(data)))]
        nodes.append(("Part", part))
    return _xml_response("ListPartsResult", nodes)


def _part_number(raw: str | None) -> int:
    if raw is None or not raw.isdigit() or not 1 <= int(raw) <= _MAX_PART_NUMBER:
        raise OssError(
            "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive."
        )
    return int(raw)


def _metadata(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    return {
        name.lower(): value for name, value in headers if name.lower().startswith("x-oss-meta-")
    }


def _write_atomically(path: Path, data: bytes) -> None:
    """Write through a temporary file; a key whose path clashes with another's is refused."""
    temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_bytes(data)
        os.replace(temporary, path)
    except (IsADirectoryError, NotADirectoryError, FileExistsError):
        temporary.unlink(missing_ok=True)
        message = "The key clashes with the path of another object (an emulator storage limit)."
        raise OssError("InvalidObjectName", message) from None


def _etag(data: bytes) -> str:
    return f'"{hashlib.md5(data).hexdigest().upper()}"'  # noqa: S324 - OSS ETags are MD5


def _put_headers(stored: _Stored, body: bytes) -> dict[str, str]:
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324
    return {"ETag": stored.etag, "Content-MD5": md5}


def _xml(root: str, nodes: Sequence[_Node]) -> bytes:
    element = ET.Element(root)
    _fill(element, nodes)
    text = ET.tostring(element, encoding="unicode")
    return f'<?xml version="1.0" encoding="UTF-8"?>\n{text}'.encode()


def _fill(parent: ET.Element, nodes: Sequence[_Node]) -> None:
    for tag, value in nodes:
        child = ET.SubElement(parent, tag)
        if isinstance(value, str):
            child.text = value
        else:
            _fill(child, value)


def _xml_response(
    root: str,
    nodes: Sequence[_Node],
    status: int = 200,
    headers: Mapping[str, str] | None = None,
) -> web.Response:
    return web.Response(
        body=_xml(root, nodes), status=status, content_type="application/xml", headers=headers
    )


def _error_response(request: web.Request, err: OssError, request_id: str) -> web.Response:
    """``<Error>`` with Code, Message, RequestId, HostId, details, EC; HEAD: in x-oss-err."""
    nodes: list[_Node] = [
        ("Code", err.code),
        ("Message", err.message),
        ("RequestId", request_id),
        ("HostId", request.host),
    ]
    nodes += [(k, v if isinstance(v, str) else list(v.items())) for k, v in err.details.items()]
    headers = {}
    if err.ec:
        nodes += [
            ("EC", err.ec),
            ("RecommendDoc", f"https://api.aliyun.com/troubleshoot?q={err.ec}"),
        ]
        headers["x-oss-ec"] = err.ec
    body = _xml("Error", nodes)
    if request.method == "HEAD":
        headers["x-oss-err"] = base64.b64encode(body).decode()
        return web.Response(status=err.status, headers=headers)
    return web.Response(
        body=body, status=err.status, content_type="application/xml", headers=headers
    )


async def start_oss_emulator(
    emulator: OssEmulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the emulator on ``host:port`` (0 picks a free port); returns runner and base URL."""
    return await serve_app(emulator.make_app(), host, port)
