"""What a presigned GET may ask OSS to answer with: the ``response-*`` overrides, checked.

GetObject's ``response-content-disposition``, ``response-content-type`` and
``response-cache-control`` query parameters set those headers of OSS's reply
(OSS "GetObject" page; ``alibabacloud_oss_v2/models/object_basic.py``
``GetObjectRequest``).  They are sent as query parameters, which V4 signs, so
a downloader can change none of them.  Each value is checked against a small
grammar here, never passed through: these headers decide whether a browser
renders a stored object or saves it, and a Content-Type that makes an object
an HTML page or a script on the bucket's origin is refused unless the
policy's ``content_types`` lists it.
"""

from __future__ import annotations

import re
from typing import Final

from broker.errors import AccessDenied, RequestInvalid
from broker.policies import Policy

__all__ = ["ACTIVE_CONTENT_TYPES", "RESPONSE_OVERRIDES", "response_overrides"]

RESPONSE_OVERRIDES: Final = {
    "response_cache_control": "response-cache-control",
    "response_content_disposition": "response-content-disposition",
    "response_content_type": "response-content-type",
}
"""Presign body field -> the GetObject query parameter it becomes."""

ACTIVE_CONTENT_TYPES: Final = frozenset(
    {
        "application/javascript",
        "application/xhtml+xml",
        "application/xml",
        "image/svg+xml",
        "text/html",
        "text/javascript",
        "text/xml",
    }
)
"""Types a browser runs as a page or script: refused unless the policy lists them."""

_MIME_PART = r"[a-z0-9][a-z0-9!#$&^_.+-]{0,126}"
_CONTENT_TYPE = re.compile(
    rf"(?P<type>{_MIME_PART}/{_MIME_PART})(?:; ?charset=[A-Za-z0-9._-]{{1,32}})?"
)
# RFC 6266: a disposition type, an ASCII quoted filename and/or an RFC 8187 filename*.
_QUOTED_NAME = r'; ?filename="[\x20\x21\x23-\x5b\x5d-\x7e]{1,255}"'
_EXT_NAME = r"; ?filename\*=(?:UTF-8|utf-8)''(?:%[0-9A-Fa-f]{2}|[A-Za-z0-9!#$&+.^_`|~-]){1,765}"
_DISPOSITION = re.compile(rf"(?:inline|attachment)(?:{_QUOTED_NAME})?(?:{_EXT_NAME})?")
_DIRECTIVE = (
    r"(?:public|private|no-cache|no-store|no-transform|must-revalidate|proxy-revalidate"
    r"|immutable|(?:max-age|s-maxage|stale-while-revalidate|stale-if-error)=[0-9]{1,9})"
)
_CACHE_CONTROL = re.compile(rf"{_DIRECTIVE}(?:, ?{_DIRECTIVE}){{0,7}}")


def response_overrides(policy: Policy, requested: dict[str, str | None]) -> dict[str, str]:
    """The ``response-*`` query parameters for the body fields given, each value checked.

    A malformed value is 400; a Content-Type the policy does not allow is 403.
    """
    query: dict[str, str] = {}
    for field, value in requested.items():
        if value is None:
            continue
        if field == "response_content_type":
            _check_content_type(policy, value)
        elif field == "response_content_disposition":
            _check(_DISPOSITION, value, field, 'inline or attachment; filename="name.ext"')
        else:
            _check(_CACHE_CONTROL, value, field, "directives such as private, max-age=600")
        query[RESPONSE_OVERRIDES[field]] = value
    return query


def _check(grammar: re.Pattern[str], value: str, field: str, example: str) -> None:
    if grammar.fullmatch(value) is None:
        raise RequestInvalid(f"{field} is not allowed; use {example}")


def _check_content_type(policy: Policy, value: str) -> None:
    match = _CONTENT_TYPE.fullmatch(value)
    if match is None:
        raise RequestInvalid(
            "response_content_type is not allowed; use type/subtype, optionally ; charset=NAME"
        )
    base = match["type"]
    if policy.content_types:
        if base not in policy.content_types:
            raise AccessDenied(
                f"response_content_type must be one of {', '.join(policy.content_types)}"
            )
    elif base in ACTIVE_CONTENT_TYPES:
        raise AccessDenied(
            f"response_content_type {base} would make the object a page or script on the "
            "bucket's origin; list it in the policy's content_types to allow it"
        )
