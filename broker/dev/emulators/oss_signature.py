"""How the OSS emulator checks V4 signatures and STS security tokens (``oss_auth`` dispatches).

Written from the OSS documentation and the official SDK's signer
(``alibabacloud_oss_v2/signer/v4.py``), never from ``broker/signing.py``: the
emulator is the independent check of the broker's signing code.

V4 signatures ("Include a V4 signature in the Authorization header" / "...in
a URL"): ``OSS4-HMAC-SHA256``, scope ``<date>/<region>/oss/aliyun_v4_request``,
signing key ``HMAC chain from "aliyun_v4" + secret``.  Canonical request:
method, URI ``/<bucket>/<key>`` (the bucket is in it whatever the addressing
style), the query pairs sorted and RFC 3986-encoded (``x-oss-signature``
left out; a pair with an empty value is just its name), every ``x-oss-*``,
``content-type`` and ``content-md5`` header plus the ``additional headers``,
the additional header names, and the ``x-oss-content-sha256`` header
(``UNSIGNED-PAYLOAD`` when absent).  ``oss_post`` checks PostObject forms with
the credential, date and key helpers here; ``oss_errors`` cites each error.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final
from urllib.parse import quote

from broker.dev.emulators.oss_errors import OssError, invalid_argument
from broker.dev.emulators.sts import IssuedCredentials, StsEmulator
from broker.models import Clock

__all__ = [
    "ALGORITHM",
    "MAX_EXPIRES_SECONDS",
    "Credential",
    "SignedRequest",
    "Verifier",
    "authenticate_v4_header",
    "authenticate_v4_query",
    "check_window",
    "mismatch_details",
    "parse_credential",
    "parse_stamp",
    "resolve",
    "signing_key",
]

ALGORITHM: Final = "OSS4-HMAC-SHA256"
MAX_EXPIRES_SECONDS: Final = 7 * 24 * 3600
_UNSIGNED: Final = "UNSIGNED-PAYLOAD"
_TERMINATOR: Final = "aliyun_v4_request"
_STAMP: Final = "%Y%m%dT%H%M%SZ"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Verifier:
    """What checking a request needs: the STS emulator's tokens, the clock, region and skew."""

    sts: StsEmulator
    clock: Clock
    region: str
    max_skew_seconds: float


@dataclass(frozen=True)
class SignedRequest:
    """A request as received: decoded query pairs in order, lower-case header names."""

    method: str
    bucket: str | None
    key: str | None
    query: Sequence[tuple[str, str]]
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


@dataclass(frozen=True)
class Credential:
    """A V4 credential: ``<AccessKeyId>/<date>/<region>/<product>/aliyun_v4_request``."""

    access_key_id: str
    date: str
    region: str
    product: str

    @property
    def scope(self) -> str:
        """The signature's scope: the credential without its access key id."""
        return f"{self.date}/{self.region}/{self.product}/{_TERMINATOR}"


def authenticate_v4_query(
    request: SignedRequest, query: Mapping[str, str], verifier: Verifier
) -> IssuedCredentials:
    """Check a V4 query signature (``x-oss-signature``); the caller's credentials."""
    if query.get("x-oss-signature-version") != ALGORITHM:
        raise invalid_argument("Unsupported x-oss-signature-version.")
    names = ("x-oss-credential", "x-oss-date", "x-oss-expires", "x-oss-signature")
    for name in names:
        if not query.get(name):
            raise invalid_argument(f"{name} is missing from the query string.")
    if len({name for name, _ in request.query}) != len(request.query):
        raise invalid_argument("A query parameter is repeated.")
    credential = parse_credential(query["x-oss-credential"], verifier.region)
    signed_at = parse_stamp(query["x-oss-date"], credential)
    expires = query["x-oss-expires"]
    if not expires.isdigit() or not 0 < int(expires) <= MAX_EXPIRES_SECONDS:
        raise invalid_argument("x-oss-expires must be an integer in 1..604800.")
    check_window(signed_at, int(expires), verifier)
    issued = resolve(credential.access_key_id, query.get("x-oss-security-token"), verifier)
    additional = _additional_headers(query.get("x-oss-additional-headers"))
    _check_v4(
        request, credential, query["x-oss-date"], additional, query["x-oss-signature"], issued
    )
    return issued


def authenticate_v4_header(
    request: SignedRequest, authorization: str, verifier: Verifier
) -> IssuedCredentials:
    """Check an ``OSS4-HMAC-SHA256`` Authorization header; the caller's credentials."""
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != ALGORITHM:
        raise invalid_argument("Authorization: only OSS4-HMAC-SHA256 is supported.")
    parts = dict(item.strip().partition("=")[::2] for item in rest.split(","))
    if not parts.get("Credential") or not parts.get("Signature"):
        raise invalid_argument("Authorization: Credential and Signature are required.")
    if "AdditionalHeaders" in parts and not parts["AdditionalHeaders"]:
        raise invalid_argument("Authorization: AdditionalHeaders is empty.", ec="0002-00000209")
    stamp = request.headers.get("x-oss-date", "")
    credential = parse_credential(parts["Credential"], verifier.region)
    signed_at = parse_stamp(stamp, credential)
    if abs(verifier.clock() - signed_at) > verifier.max_skew_seconds:
        raise OssError("RequestTimeTooSkewed", ec="0002-00000504")
    _check_payload_hash(request)
    issued = resolve(
        credential.access_key_id, request.headers.get("x-oss-security-token"), verifier
    )
    additional = _additional_headers(parts.get("AdditionalHeaders"))
    _check_v4(request, credential, stamp, additional, parts["Signature"], issued)
    return issued


def parse_credential(raw: str, region: str) -> Credential:
    """``<AccessKeyId>/<YYYYMMDD>/<region>/oss/aliyun_v4_request``, for this region."""
    pieces = raw.split("/")
    if len(pieces) != 5 or pieces[4] != _TERMINATOR or pieces[3] != "oss" or not pieces[0]:
        raise invalid_argument(
            "Credential must be <AccessKeyId>/<date>/<region>/oss/aliyun_v4_request.",
        )
    if pieces[2] != region:
        raise OssError(
            "AccessDenied", f"Invalid signing region in credential; expecting {region!r}."
        )
    return Credential(*pieces[:4])


def parse_stamp(stamp: str, credential: Credential | None) -> float:
    """``x-oss-date`` (``YYYYMMDDTHHMMSSZ``) as epoch seconds; its day must be the scope's."""
    try:
        moment = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        raise invalid_argument("x-oss-date must be in the form YYYYMMDDTHHMMSSZ.") from None
    if credential is not None and stamp[:8] != credential.date:
        raise invalid_argument("The credential date is not the day of x-oss-date.")
    return moment.timestamp()


def check_window(signed_at: float, lifetime_seconds: int, verifier: Verifier) -> None:
    """Not signed more than the skew in the future; not past ``x-oss-date + expires``."""
    now = verifier.clock()
    if signed_at - now > verifier.max_skew_seconds:
        raise OssError("RequestTimeTooSkewed", ec="0002-00000235")
    if now > signed_at + lifetime_seconds:
        details = {"Expires": _iso(signed_at + lifetime_seconds), "ServerTime": _iso(now)}
        raise OssError("AccessDenied", "Request has expired.", ec="0002-00000069", details=details)


def _check_payload_hash(request: SignedRequest) -> None:
    declared = request.headers.get("x-oss-content-sha256")
    if declared is None:
        raise invalid_argument("Missing required header: x-oss-content-sha256.")
    if declared == _UNSIGNED:
        return
    if _HEX64.fullmatch(declared) is None or declared != hashlib.sha256(request.body).hexdigest():
        raise invalid_argument("x-oss-content-sha256 does not match the request body.")


def _additional_headers(raw: str | None) -> list[str]:
    """Lower-case, sorted, no empty or repeated names (OSS EC 0002-00000209/210)."""
    if raw is None:
        return []
    names = raw.split(";")
    if any(not name for name in names):
        raise invalid_argument("Additional headers contain an empty name.", ec="0002-00000210")
    if names != sorted({name.lower() for name in names}):
        raise invalid_argument("Additional headers must be lower-case, sorted, unique.")
    return names


def _check_v4(
    request: SignedRequest,
    credential: Credential,
    stamp: str,
    additional: list[str],
    provided: str,
    issued: IssuedCredentials,
) -> None:
    canonical = _canonical_request(request, additional)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    string_to_sign = f"{ALGORITHM}\n{stamp}\n{credential.scope}\n{digest}"
    key = signing_key(issued.access_key_secret, credential)
    expected = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, provided):
        details = mismatch_details(credential.access_key_id, provided, string_to_sign)
        details["CanonicalRequest"] = canonical
        details["CanonicalRequestBytes"] = _hex_bytes(canonical)
        raise OssError("SignatureDoesNotMatch", ec="0002-00000201", details=details)


def _canonical_request(request: SignedRequest, additional: list[str]) -> str:
    uri = "/" if request.bucket is None else f"/{request.bucket}/{request.key or ''}"
    pairs = sorted(
        (quote(name, safe=""), quote(value, safe=""))
        for name, value in request.query
        if name != "x-oss-signature"
    )
    query = "&".join(f"{name}={value}" if value else name for name, value in pairs)
    signed = sorted(
        name
        for name in request.headers
        if name.startswith("x-oss-")
        or name in {"content-type", "content-md5"}
        or name in additional
    )
    headers = "".join(f"{name}:{request.headers[name].strip()}\n" for name in signed)
    payload = request.headers.get("x-oss-content-sha256", _UNSIGNED)
    return "\n".join(
        [request.method, quote(uri, safe="/"), query, headers, ";".join(additional), payload]
    )


def signing_key(secret: str, credential: Credential) -> bytes:
    """The V4 signing key: HMAC-SHA256 chained over the scope, from ``"aliyun_v4" + secret``."""
    key = ("aliyun_v4" + secret).encode("utf-8")
    for part in (credential.date, credential.region, credential.product, _TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def mismatch_details(access_key_id: str, provided: str, string_to_sign: str) -> dict[str, str]:
    """The elements OSS adds to ``SignatureDoesNotMatch`` to help debug a signer."""
    return {
        "OSSAccessKeyId": access_key_id,
        "SignatureProvided": provided,
        "StringToSign": string_to_sign,
        "StringToSignBytes": _hex_bytes(string_to_sign),
    }


def resolve(access_key_id: str, token: str | None, verifier: Verifier) -> IssuedCredentials:
    """The STS credentials behind an access key id and its security token."""
    issued = verifier.sts.lookup_security_token(token) if token else None
    if issued is None or not hmac.compare_digest(issued.access_key_id, access_key_id):
        details = {"OSSAccessKeyId": access_key_id}
        ec = "0002-00000004" if token else "0002-00000002"
        raise OssError("InvalidAccessKeyId", ec=ec, details=details)
    if verifier.clock() >= issued.expires_at:
        raise OssError("SecurityTokenExpired", ec="0002-00000007")
    return issued


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _hex_bytes(text: str) -> str:
    return " ".join(f"{byte:02X}" for byte in text.encode("utf-8"))
