"""ListObjects (GetBucket) and ListObjectsV2 (GetBucketV2) in the OSS emulator.

Parameters and the ``ListBucketResult`` shape as OSS documents them and as
the official clients parse them: ``oss2/xml_utils.py`` ``parse_list_objects``
and ``parse_list_objects_v2`` (``encoding-type=url`` is oss2's default; keys,
prefixes and markers are then URL-encoded and the client unquotes them),
``alibabacloud_oss_v2/models/bucket_basic.py`` ``ListObjectsResult`` /
``ListObjectsV2Result`` with ``serde_utils.deserialize_encode_type``, and
``ali-oss`` ``lib/object.js`` ``list`` (reads ``Contents.Owner.ID`` and
``DisplayName`` unconditionally: V1 always carries ``Owner``) and ``listV2``
(``Owner`` only with ``fetch-owner=true``).

Keys come back in lexicographic order; with a ``delimiter`` the keys sharing
``prefix + ... + delimiter`` fold into one ``CommonPrefixes`` entry; keys and
common prefixes together count against ``max-keys`` (1..1000, default 100).
V1 resumes after ``marker`` (``NextMarker`` when truncated); V2 after
``continuation-token`` (opaque here: the last name returned, base64url) or
``start-after``.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote

from aiohttp import web

from broker.dev.emulators.oss_errors import OssError, invalid_argument
from broker.dev.emulators.oss_store import ObjectStore, StoredObject
from broker.dev.emulators.oss_xml import Node, xml_response

__all__ = ["list_objects"]

_DEFAULT_MAX_KEYS: Final = 100
_MAX_KEYS: Final = 1000
_Entry = tuple[str, StoredObject | None]  # (key, attributes) or (common prefix, None)


def list_objects(
    store: ObjectStore, bucket: str, params: Mapping[str, str], *, v2: bool, owner: str
) -> web.Response:
    """The ``ListBucketResult`` for ``bucket`` and the request's query ``params``."""
    prefix, delimiter = params.get("prefix", ""), params.get("delimiter", "")
    max_keys = _max_keys(params.get("max-keys"))
    encode = _encoder(params.get("encoding-type"))
    start = _start_after(params, v2=v2)
    entries = _entries(store.list(bucket), prefix, delimiter, start, max_keys + 1)
    truncated = len(entries) > max_keys
    entries = entries[:max_keys]
    nodes: list[Node] = [("Name", bucket), ("Prefix", encode(prefix))]
    if v2:
        nodes += _v2_head(params, encode)
    else:
        nodes.append(("Marker", encode(params.get("marker", ""))))
    nodes += [("MaxKeys", str(max_keys)), ("Delimiter", encode(delimiter))]
    if params.get("encoding-type"):
        nodes.append(("EncodingType", "url"))
    nodes.append(("IsTruncated", "true" if truncated else "false"))
    if truncated:
        last = entries[-1][0]
        next_node = ("NextContinuationToken", _token(last)) if v2 else ("NextMarker", encode(last))
        nodes.append(next_node)
    with_owner = not v2 or params.get("fetch-owner") == "true"
    nodes += [_node(entry, encode, owner if with_owner else None) for entry in entries]
    if v2:
        nodes.append(("KeyCount", str(len(entries))))
    return xml_response("ListBucketResult", nodes)


def _v2_head(params: Mapping[str, str], encode: _Encode) -> list[Node]:
    nodes: list[Node] = []
    if params.get("start-after"):
        nodes.append(("StartAfter", encode(params["start-after"])))
    if params.get("continuation-token"):
        nodes.append(("ContinuationToken", params["continuation-token"]))
    return nodes


def _entries(
    objects: list[tuple[str, StoredObject]], prefix: str, delimiter: str, start: str, limit: int
) -> list[_Entry]:
    """Keys and common prefixes after ``start``, in order, at most ``limit``."""
    entries: list[_Entry] = []
    for key, stored in objects:
        if not key.startswith(prefix) or key <= start:
            continue
        cut = key.find(delimiter, len(prefix)) if delimiter else -1
        if cut < 0:
            entries.append((key, stored))
        else:
            common = key[: cut + len(delimiter)]
            if common <= start or (entries and entries[-1] == (common, None)):
                continue
            entries.append((common, None))
        if len(entries) >= limit:
            break
    return entries


def _node(entry: _Entry, encode: _Encode, owner: str | None) -> Node:
    name, stored = entry
    if stored is None:
        return ("CommonPrefixes", [("Prefix", encode(name))])
    modified = datetime.fromtimestamp(stored.last_modified, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    nodes: list[Node] = [
        ("Key", encode(name)),
        ("LastModified", modified),
        ("ETag", stored.etag),
        ("Type", stored.object_type),
        ("Size", str(stored.size)),
        ("StorageClass", "Standard"),
    ]
    if owner is not None:
        nodes.append(("Owner", [("ID", owner), ("DisplayName", owner)]))
    return ("Contents", nodes)


def _max_keys(raw: str | None) -> int:
    if raw is None or raw == "":
        return _DEFAULT_MAX_KEYS
    if not raw.isdigit() or not 1 <= int(raw) <= _MAX_KEYS:
        raise invalid_argument("max-keys must be an integer from 1 to 1000.")
    return int(raw)


def _start_after(params: Mapping[str, str], *, v2: bool) -> str:
    if not v2:
        return params.get("marker", "")
    token = params.get("continuation-token")
    if not token:
        return params.get("start-after", "")
    try:
        name = base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (binascii.Error, UnicodeError, ValueError):
        name = None
    if name is None or _token(name) != token:  # only tokens this emulator issued
        raise invalid_argument("The continuation token provided is incorrect.")
    return name


def _token(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode("utf-8")).decode("ascii")


class _Encode:
    """Names as sent (no ``encoding-type``) or URL-encoded (``encoding-type=url``)."""

    def __init__(self, url: bool) -> None:
        self._url = url

    def __call__(self, text: str) -> str:
        return quote(text, safe="") if self._url else text


def _encoder(encoding_type: str | None) -> _Encode:
    if encoding_type not in {None, "", "url"}:
        raise OssError("InvalidArgument", "encoding-type must be url.")
    return _Encode(bool(encoding_type))
