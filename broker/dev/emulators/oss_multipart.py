"""Multipart uploads in the OSS emulator: Initiate, UploadPart, ListParts, Complete, Abort.

As OSS documents them: part numbers 1..10,000; Initiate keeps the object's
Content-Type, stored headers, ACL and metadata; Complete lists parts in
ascending order with their ETags (or ``x-oss-complete-all: yes`` takes every
part), all but the last at least 100 KB; the object's ETag is the MD5 of the
parts' MD5s, then ``-<parts>``.
"""

from __future__ import annotations

import hashlib
import uuid
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final
from urllib.parse import quote

from aiohttp import web

from broker.dev.emulators.oss_errors import OssError
from broker.dev.emulators.oss_store import STORED_HEADERS, ObjectStore, etag_of, metadata_of
from broker.dev.emulators.oss_xml import Node, xml_response

__all__ = ["MultipartUploads", "PartTarget"]

_MIN_PART_BYTES: Final = 100 * 1024
_MAX_PART_NUMBER: Final = 10_000


@dataclass(frozen=True)
class PartTarget:
    """Where a multipart request points: bucket, key, and the upload id and part number given."""

    bucket: str
    key: str
    upload_id: str | None
    part_number: str | None


@dataclass
class _Upload:
    bucket: str
    key: str
    headers: Mapping[str, str]
    parts: dict[int, tuple[str, bytes]] = field(default_factory=dict)


class MultipartUploads:
    """The uploads in progress; completed ones go to the object store."""

    def __init__(self, store: ObjectStore) -> None:
        self._store = store
        self._uploads: dict[str, _Upload] = {}

    def answer(
        self, request: web.Request, operation: str, target: PartTarget, body: bytes
    ) -> web.Response:
        """Answer one multipart operation (already authenticated and authorized)."""
        if operation == "InitiateMultipartUpload":
            return self._initiate(request, target)
        upload_id = target.upload_id or ""
        upload = self._upload(upload_id, target)
        if operation == "UploadPart":
            etag = etag_of(body)
            upload.parts[_part_number(target.part_number)] = (etag, body)
            return web.Response(headers={"ETag": etag})
        if operation == "AbortMultipartUpload":
            del self._uploads[upload_id]
            return web.Response(status=204)
        if operation == "ListParts":
            return _list_parts(upload, upload_id)
        return self._complete(request, upload_id, upload, body)

    def _initiate(self, request: web.Request, target: PartTarget) -> web.Response:
        self._store.check_overwrite(request.headers, target.bucket, target.key)
        upload_id = uuid.uuid4().hex.upper()
        kept = ("Content-Type", "x-oss-object-acl", *STORED_HEADERS)
        headers = {name: request.headers[name] for name in kept if name in request.headers}
        headers.update(metadata_of(request.headers.items()))
        self._uploads[upload_id] = _Upload(target.bucket, target.key, headers)
        nodes = [("Bucket", target.bucket), ("Key", target.key), ("UploadId", upload_id)]
        return xml_response("InitiateMultipartUploadResult", nodes)

    def _upload(self, upload_id: str, target: PartTarget) -> _Upload:
        upload = self._uploads.get(upload_id)
        if upload is None or (upload.bucket, upload.key) != (target.bucket, target.key):
            raise OssError("NoSuchUpload", details={"UploadId": upload_id})
        return upload

    def _complete(
        self, request: web.Request, upload_id: str, upload: _Upload, body: bytes
    ) -> web.Response:
        if request.headers.get("x-oss-complete-all", "").lower() == "yes":
            listed = [(number, upload.parts[number][0]) for number in sorted(upload.parts)]
        else:
            listed = _parse_complete(body)
        chosen = _chosen_parts(upload, listed)
        self._store.check_overwrite(
            request.headers, upload.bucket, upload.key, exists_ec="0042-00000214"
        )
        digest = hashlib.md5(b"".join(hashlib.md5(part).digest() for part in chosen))  # noqa: S324
        etag = f'"{digest.hexdigest().upper()}-{len(chosen)}"'
        data = b"".join(chosen)
        self._store.put(upload.bucket, upload.key, data, upload.headers, "Multipart", etag)
        del self._uploads[upload_id]
        location = f"http://{request.host}/{upload.bucket}/{quote(upload.key)}"
        nodes = [("Location", location), ("Bucket", upload.bucket), ("Key", upload.key)]
        return xml_response("CompleteMultipartUploadResult", [*nodes, ("ETag", etag)])


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
    nodes: list[Node] = [("Bucket", upload.bucket), ("Key", upload.key), ("UploadId", upload_id)]
    nodes += [("MaxParts", "1000"), ("IsTruncated", "false")]
    for number in sorted(upload.parts):
        etag, data = upload.parts[number]
        part = [("PartNumber", str(number)), ("ETag", etag), ("Size", str(len(data)))]
        nodes.append(("Part", part))
    return xml_response("ListPartsResult", nodes)


def _part_number(raw: str | None) -> int:
    if raw is None or not raw.isdigit() or not 1 <= int(raw) <= _MAX_PART_NUMBER:
        raise OssError(
            "InvalidArgument", "Part number must be an integer between 1 and 10000, inclusive."
        )
    return int(raw)
