"""An OSS emulator: objects, listings, uploads by URL, form and multipart, checked as OSS does.

It answers the official clients (``alibabacloud-oss-v2``, ``oss2``, ``ali-oss``)
and browsers over real HTTP: PutObject, GetObject (with the ``response-*``
overrides), HeadObject, GetObjectMeta, DeleteObject, ListObjects and ListObjectsV2
(``oss_list``), multipart (Initiate, UploadPart, Complete, Abort, ListParts),
PostObject forms and CORS.  Every request is authenticated (``oss_auth``:
V1 and V4 signatures in headers or URLs; ``oss_post`` for forms) against
tokens the STS emulator issued, and authorized against the token's inline RAM
policy with its Conditions (``oss_ram``, ``ram``).  Objects live on disk
(``oss_store``); multipart uploads in ``oss_multipart``.  Errors are OSS's XML
(``Code``, ``Message``, ``RequestId``, ``HostId``, extra elements, ``EC``) with
``x-oss-request-id``; ``oss_errors`` lists where each comes from.  An API the
emulator does not implement is 501 ``NotImplemented`` (``oss_request``).

Stricter than OSS, on purpose: keys with empty, ``.`` or ``..`` segments are
refused (they cannot be stored safely on disk).  A PostObject ``callback`` is
recorded in ``callbacks``, never called: the object is stored and the answer
is OSS's for a callback that did not succeed (203 ``CallbackFailed``).
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from email.utils import formatdate
from pathlib import Path
from typing import Any, Final

from aiohttp import web

from broker.dev.emulators import serve_app
from broker.dev.emulators.oss_auth import authenticate
from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.oss_list import list_objects
from broker.dev.emulators.oss_multipart import MultipartUploads, PartTarget
from broker.dev.emulators.oss_post import (
    authenticate_post,
    parse_callback,
    post_headers,
    post_response,
    read_form,
)
from broker.dev.emulators.oss_ram import account_of, authorize, condition_values
from broker.dev.emulators.oss_request import (
    ACTIONS,
    RESPONSE_OVERRIDES,
    Exchange,
    check_content_md5,
    check_key,
    operation_of,
    parse_target,
    read_body,
    signed_request,
)
from broker.dev.emulators.oss_signature import Verifier
from broker.dev.emulators.oss_store import ObjectStore, StoredObject
from broker.dev.emulators.oss_xml import error_response
from broker.dev.emulators.sts import StsEmulator
from broker.models import Clock, system_clock

__all__ = ["OssEmulator", "RecordedCallback", "RecordedOssRequest", "start_oss_emulator"]

_FORM_OVERHEAD_BYTES: Final = 1024 * 1024
_CORS_METHODS: Final = ("GET", "PUT", "POST", "DELETE", "HEAD")
_EXPOSED: Final = "ETag, x-oss-request-id"
_LISTS: Final = frozenset({"ListObjects", "ListObjectsV2"})


@dataclass(frozen=True)
class RecordedOssRequest:
    """One request as the emulator saw it, and how it answered."""

    method: str
    bucket: str | None
    key: str | None
    operation: str
    status: int
    error_code: str | None


@dataclass(frozen=True)
class RecordedCallback:
    """A PostObject ``callback`` the emulator received (and did not call)."""

    bucket: str
    key: str
    callback: Mapping[str, Any]


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
    ) -> None:
        self._verifier = Verifier(sts, clock, region, max_skew_seconds)
        self._store = ObjectStore(storage_dir, clock)
        self._multipart = MultipartUploads(self._store)
        self._region = region
        self._buckets = frozenset(buckets)
        self._origins = tuple(cors_allow_origins)
        self._max_object_bytes = max_object_bytes
        self.requests: list[RecordedOssRequest] = []
        self.callbacks: list[RecordedCallback] = []

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

    def object_attributes(self, bucket: str, key: str) -> StoredObject | None:
        """What is stored with an object besides its bytes (type, headers, ACL, ...), or None."""
        return self._store.get(bucket, key)

    async def answer(self, request: web.Request) -> web.StreamResponse:
        """Answer one request; OSS-style XML for every error."""
        request_id = uuid.uuid4().hex[:24].upper()
        exchange = Exchange()
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

    async def _dispatch(self, request: web.Request, exchange: Exchange) -> web.StreamResponse:
        parse_target(request, self._buckets, exchange)
        exchange.operation = operation_of(request.method, exchange)
        if exchange.bucket not in self._buckets:
            raise OssError("NoSuchBucket", details={"BucketName": exchange.bucket or ""})
        if exchange.operation == "PreflightCors":
            return self._preflight(request)
        if exchange.operation == "PostObject":
            return await self._post_object(request, exchange)
        if exchange.key is not None:
            check_key(exchange.key)
        body = await read_body(request, self._max_object_bytes)
        check_content_md5(request, body)
        issued = authenticate(signed_request(request, exchange, body), self._verifier)
        listing = exchange.operation in _LISTS
        params = exchange.params()
        values = self._conditions(request, params if listing else None)
        key = None if listing else exchange.key
        action = ACTIONS[exchange.operation]
        authorize(issued, action, exchange.bucket or "", key, self._region, values)
        if listing:
            v2 = exchange.operation == "ListObjectsV2"
            owner = account_of(issued)
            return list_objects(self._store, exchange.bucket or "", params, v2=v2, owner=owner)
        return self._operate(request, exchange, body)

    def _conditions(
        self, request: web.Request, list_params: Mapping[str, str] | None
    ) -> dict[str, str | None]:
        """The RAM condition values this request presents (TCP peer, transport, time, ...)."""
        now = self._verifier.clock()
        return condition_values(now, request.remote, secure=request.secure, list_params=list_params)

    def _operate(self, request: web.Request, exchange: Exchange, body: bytes) -> web.Response:
        bucket, key, operation = exchange.bucket or "", exchange.key or "", exchange.operation
        if operation == "PutObject":
            self._store.check_overwrite(request.headers, bucket, key)
            stored = self._store.put(bucket, key, body, request.headers, "Normal")
            return web.Response(headers=_put_headers(stored, body))
        if operation in {"GetObject", "HeadObject"}:
            return self._get_object(bucket, key, exchange.params())
        if operation == "GetObjectMeta":
            return self._object_meta(bucket, key)
        if operation == "DeleteObject":
            self._store.delete(bucket, key)
            return web.Response(status=204)
        target = PartTarget(bucket, key, exchange.param("uploadId"), exchange.param("partNumber"))
        return self._multipart.answer(request, operation, target, body)

    async def _post_object(self, request: web.Request, exchange: Exchange) -> web.Response:
        form, content = await read_form(request, self._max_object_bytes)
        raw_key = form.fields.get("key")
        if not raw_key:
            raise OssError("InvalidArgument", "Bucket POST must contain a field named 'key'.")
        bucket = exchange.bucket or ""
        issued = authenticate_post(form, bucket, self._verifier)
        exchange.key = key = raw_key.replace("${filename}", form.file_name)
        check_key(key)
        values = self._conditions(request, None)
        authorize(issued, "oss:PutObject", bucket, key, self._region, values)
        callback = parse_callback(form.fields)
        self._store.check_overwrite(form.fields, bucket, key, invalid_ec="0006-00000117")
        stored = self._store.put(bucket, key, content, post_headers(form), "Normal")
        if callback is not None:
            self.callbacks.append(RecordedCallback(bucket, key, callback))
            raise OssError("CallbackFailed")
        return post_response(form.fields, bucket, key, stored.etag)

    def _get_object(self, bucket: str, key: str, params: Mapping[str, str]) -> web.Response:
        stored = self._store.get(bucket, key)
        if stored is None:
            raise OssError("NoSuchKey", ec="0026-00000001", details={"Key": key})
        headers = {
            "Content-Type": stored.content_type,
            "ETag": stored.etag,
            "Last-Modified": formatdate(stored.last_modified, usegmt=True),
            "x-oss-object-type": stored.object_type,
            "x-oss-storage-class": "Standard",
            **stored.headers,
            **stored.metadata,
        }
        headers.update(_overrides(params))
        return web.Response(body=self._store.read(bucket, key), headers=headers)

    def _object_meta(self, bucket: str, key: str) -> web.Response:
        """GetObjectMeta: only Content-Length, ETag and Last-Modified (OSS doc 31985)."""
        stored = self._store.get(bucket, key)
        if stored is None:
            raise OssError("NoSuchKey", ec="0026-00000001", details={"Key": key})
        modified = formatdate(stored.last_modified, usegmt=True)
        headers = {"ETag": stored.etag, "Last-Modified": modified}
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


def _overrides(params: Mapping[str, str]) -> dict[str, str]:
    """GetObject's ``response-*`` parameters as the response headers they set."""
    chosen = {RESPONSE_OVERRIDES[n]: v for n, v in params.items() if n in RESPONSE_OVERRIDES}
    for value in chosen.values():
        if not value.isascii() or not value.isprintable():
            raise OssError("InvalidArgument", "response-* values must be printable ASCII.")
    return chosen


def _put_headers(stored: StoredObject, body: bytes) -> dict[str, str]:
    md5 = base64.b64encode(hashlib.md5(body).digest()).decode()  # noqa: S324
    return {"ETag": stored.etag, "Content-MD5": md5}


async def start_oss_emulator(
    emulator: OssEmulator, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve the emulator on ``host:port`` (0 picks a free port); returns runner and base URL."""
    return await serve_app(emulator.make_app(), host, port)
