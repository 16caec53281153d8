"""The OSS emulator's objects: bytes on disk in ``storage_dir/<bucket>/<key>``, the rest in memory.

Content-Type, the other standard headers OSS stores with an object
(Cache-Control, Content-Disposition, Content-Encoding, Content-Language,
Expires: "PutObject" and "PostObject" pages), ``x-oss-meta-*``, the object ACL
(``x-oss-object-acl``), ETag and times stay in memory; a key whose path would
leave its bucket's directory, or clash with another key's path (``a`` and
``a/b``), is refused with ``InvalidObjectName``.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from broker.dev.emulators.oss_errors import OssError
from broker.models import Clock

__all__ = [
    "DEFAULT_TYPE",
    "STORED_HEADERS",
    "ObjectStore",
    "StoredObject",
    "etag_of",
    "metadata_of",
]

DEFAULT_TYPE: Final = "application/octet-stream"
STORED_HEADERS: Final = (
    "Cache-Control",
    "Content-Disposition",
    "Content-Encoding",
    "Content-Language",
    "Expires",
)
"""Standard headers stored with an object and returned by GetObject/HeadObject."""
_ACLS: Final = frozenset({"default", "private", "public-read", "public-read-write"})


@dataclass(frozen=True)
class StoredObject:
    """What the emulator knows of an object besides its bytes."""

    etag: str
    content_type: str
    metadata: Mapping[str, str]
    last_modified: float
    size: int
    object_type: str
    headers: Mapping[str, str] = field(default_factory=dict)
    acl: str = "default"


class ObjectStore:
    """Objects by (bucket, key): bytes written atomically to disk, attributes in memory."""

    def __init__(self, storage_dir: Path, clock: Clock) -> None:
        self._storage_dir = Path(storage_dir)
        self._clock = clock
        self._objects: dict[tuple[str, str], StoredObject] = {}

    def get(self, bucket: str, key: str) -> StoredObject | None:
        """An object's attributes, or None."""
        return self._objects.get((bucket, key))

    def list(self, bucket: str) -> list[tuple[str, StoredObject]]:
        """Every object of ``bucket`` as (key, attributes), in key order."""
        found = [(key, obj) for (name, key), obj in self._objects.items() if name == bucket]
        return sorted(found, key=lambda item: item[0])

    def read(self, bucket: str, key: str) -> bytes:
        """A stored object's bytes."""
        return self._path(bucket, key).read_bytes()

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes,
        headers: Mapping[str, str],
        object_type: str,
        etag: str | None = None,
    ) -> StoredObject:
        """Store ``data`` with the type, standard headers, metadata and ACL found in ``headers``."""
        content_type, standard, metadata, acl = _attributes(headers)
        _write_atomically(self._path(bucket, key), data)
        etag = etag or etag_of(data)
        attributes = (content_type, metadata, self._clock(), len(data), object_type, standard, acl)
        stored = StoredObject(etag, *attributes)
        self._objects[(bucket, key)] = stored
        return stored

    def delete(self, bucket: str, key: str) -> None:
        """Forget an object and remove its file and the directories it leaves empty."""
        if self._objects.pop((bucket, key), None) is None:
            return
        path = self._path(bucket, key)
        path.unlink(missing_ok=True)
        top = (self._storage_dir / bucket).resolve()
        for parent in path.parents:
            if parent == top or any(parent.iterdir()):
                break
            parent.rmdir()

    def check_overwrite(
        self,
        headers: Mapping[str, str],
        bucket: str,
        key: str,
        invalid_ec: str = "0017-00000279",
        exists_ec: str = "0026-00000003",
    ) -> None:
        """``x-oss-forbid-overwrite: true`` on an existing key is ``FileAlreadyExists``.

        Only ``true`` and ``false`` are valid (EC 0017-00000279 for the header,
        0006-00000117 for the PostObject form field).  CompleteMultipartUpload
        onto an existing key has its own EC, 0042-00000214
        (https://help.aliyun.com/en/oss/user-guide/0042-00000214).
        """
        forbid = (_header(headers, "x-oss-forbid-overwrite") or "false").lower()
        if forbid not in {"true", "false"}:
            message = "x-oss-forbid-overwrite must be true or false."
            raise OssError("InvalidArgument", message, ec=invalid_ec)
        if forbid == "true" and (bucket, key) in self._objects:
            raise OssError("FileAlreadyExists", ec=exists_ec)

    def _path(self, bucket: str, key: str) -> Path:
        """``storage_dir/<bucket>/<key>``, refused if it would leave the bucket's directory."""
        base = (self._storage_dir / bucket).resolve()
        path = (base / key).resolve()
        if path == base or not path.is_relative_to(base):
            raise OssError("InvalidObjectName")
        return path


def etag_of(data: bytes) -> str:
    """An object's ETag: its MD5, upper-case hex, quoted."""
    return f'"{hashlib.md5(data).hexdigest().upper()}"'  # noqa: S324 - OSS ETags are MD5


def metadata_of(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The ``x-oss-meta-*`` headers, names lower-cased."""
    return {
        name.lower(): value for name, value in headers if name.lower().startswith("x-oss-meta-")
    }


def _attributes(
    headers: Mapping[str, str],
) -> tuple[str, dict[str, str], dict[str, str], str]:
    """Content-Type, stored standard headers, ``x-oss-meta-*`` and ACL, each checked."""
    content_type = _header(headers, "content-type") or DEFAULT_TYPE
    metadata = metadata_of(headers.items())
    kept = {name: _header(headers, name) for name in STORED_HEADERS}
    standard = {name: value for name, value in kept.items() if value}
    for value in (content_type, *metadata.values(), *standard.values()):
        _check_header_value(value)
    acl = _header(headers, "x-oss-object-acl") or "default"
    if acl not in _ACLS:
        raise OssError("InvalidArgument", "The x-oss-object-acl value is not valid.")
    return content_type, standard, metadata, acl


def _header(headers: Mapping[str, str], name: str) -> str | None:
    """A header (or form field) by case-insensitive name."""
    lowered = name.lower()
    return next((value for key, value in headers.items() if key.lower() == lowered), None)


def _check_header_value(value: str) -> None:
    if not value.isascii() or not value.isprintable():
        raise OssError(
            "InvalidArgument", "Stored header and x-oss-meta-* values must be printable ASCII."
        )


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
