"""ACS3-HMAC-SHA256 (the POP "V3" signature) as the STS emulator checks it.

The canonical request is rebuilt exactly as the official SDK's
``alibabacloud_tea_openapi.utils.get_authorization`` builds it: method, path,
the sorted RFC 3986-encoded query, the signed headers (``name:v1,v2``), their
names and the body's SHA-256; the string to sign is the algorithm and the
canonical request's SHA-256, signed with HMAC-SHA256 of the secret.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote

from aiohttp import web

from broker.dev.emulators.sts_errors import StsError

__all__ = ["ALGORITHM", "Authorization", "caller_of", "check_action", "check_signature"]

ALGORITHM: Final = "ACS3-HMAC-SHA256"
_ACTION: Final = "AssumeRole"
_VERSION: Final = "2015-04-01"
_REQUIRED_SIGNED: Final = frozenset(
    {"host", "x-acs-action", "x-acs-version", "x-acs-date", "x-acs-content-sha256"}
)
_AUTHORIZATION = re.compile(
    r"(?P<algorithm>\S+) Credential=(?P<credential>[^,]+),"
    r"SignedHeaders=(?P<signed>[^,]+),Signature=(?P<signature>[0-9a-f]{64})"
)


@dataclass(frozen=True)
class Authorization:
    """A well-formed ``Authorization`` header: the access key id, signed headers, signature."""

    access_key_id: str
    signed_headers: list[str]
    signature: str

    @classmethod
    def parse(cls, header: str) -> Authorization:
        """Parse the header; ``IncompleteSignature`` unless it is ACS3-HMAC-SHA256."""
        match = _AUTHORIZATION.fullmatch(header)
        if match is None or match["algorithm"] != ALGORITHM:
            raise StsError("IncompleteSignature")
        return cls(match["credential"], match["signed"].split(";"), match["signature"])


def caller_of(authorization: str) -> str:
    """The access key id named in an Authorization header, or ``""``."""
    match = _AUTHORIZATION.fullmatch(authorization)
    return match["credential"] if match else ""


def check_signature(
    request: web.Request, authorization: Authorization, body: bytes, secret: str
) -> None:
    """The signed headers are complete and the signature is the secret's, or ``StsError``."""
    _check_signed_headers(request, authorization.signed_headers)
    expected = _signature(request, authorization.signed_headers, body, secret)
    if not hmac.compare_digest(expected, authorization.signature):
        raise StsError("SignatureDoesNotMatch")


def check_action(request: web.Request) -> None:
    """The request calls AssumeRole of STS's 2015-04-01 API."""
    if request.headers.get("x-acs-action") != _ACTION:
        raise StsError("InvalidAction.NotFound")
    if request.headers.get("x-acs-version") != _VERSION:
        raise StsError("InvalidVersion")


def _check_signed_headers(request: web.Request, signed: list[str]) -> None:
    """Every common header present must be signed, and the required ones present."""
    names = set(signed)
    present = {name.lower() for name in request.headers}
    must_sign = _REQUIRED_SIGNED | {name for name in present if name.startswith("x-acs-")}
    if not must_sign <= names or not names <= present or signed != sorted(names):
        raise StsError("IncompleteSignature")


def _signature(request: web.Request, signed: list[str], body: bytes, secret: str) -> str:
    """The hex ACS3-HMAC-SHA256 signature of the request as received."""
    canonical = "\n".join(
        [
            request.method,
            request.path or "/",
            _canonical_query(request.query),
            _canonical_headers(request, signed),
            ";".join(signed),
            hashlib.sha256(body).hexdigest(),
        ]
    )
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    to_sign = f"{ALGORITHM}\n{digest}"
    return hmac.new(secret.encode("utf-8"), to_sign.encode("utf-8"), hashlib.sha256).hexdigest()


def _canonical_query(query: Mapping[str, str]) -> str:
    """As ``get_canonical_query_string``: sorted keys, values RFC 3986-encoded."""
    return "&".join(f"{key}={quote(query[key], safe='~')}" for key in sorted(query))


def _canonical_headers(request: web.Request, signed: list[str]) -> str:
    """As ``get_canonicalized_headers``: ``name:v1,v2\\n`` for each signed header."""
    lines = []
    for name in signed:
        values = sorted(value.strip() for value in request.headers.getall(name))
        lines.append(f"{name}:{','.join(values)}\n")
    return "".join(lines)
