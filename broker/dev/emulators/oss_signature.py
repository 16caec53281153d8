"""How the OSS emulator decides who sent a request and whether it may: signatures and policies.

Written from the OSS documentation and the official SDK's signer
(``alibabacloud_oss_v2/signer/v4.py``), never from ``broker/signing.py``: the
emulator is the independent check of the broker's signing code.

* V4 signatures ("Include a V4 signature in the Authorization header" / "...in
  a URL"): ``OSS4-HMAC-SHA256``, scope ``<date>/<region>/oss/aliyun_v4_request``,
  signing key ``HMAC chain from "aliyun_v4" + secret``.  Canonical request:
  method, URI ``/<bucket>/<key>`` (the bucket is in it whatever the addressing
  style), the query pairs sorted and RFC 3986-encoded (``x-oss-signature``
  left out; a pair with an empty value is just its name), every ``x-oss-*``,
  ``content-type`` and ``content-md5`` header plus the ``additional headers``,
  the additional header names, and the ``x-oss-content-sha256`` header
  (``UNSIGNED-PAYLOAD`` when absent).
* PostObject ("POST V4 signature", "POST V1 signature"): V4 signs the base64
  policy with the V4 signing key (hex), V1 with HMAC-SHA1 of the secret
  (base64); the policy's ``expiration`` and every condition are enforced.
* Authorization: the token's inline RAM policy, ``Deny`` before ``Allow``,
  ``*`` and ``?`` wildcards, on ``acs:oss:<region>:<account>:<bucket>/<key>``.

Codes, messages and ECs come from the OSS docs: "Troubleshoot signature errors"
(SignatureDoesNotMatch and its StringToSign/CanonicalRequest elements), the EC
pages 0002-00000069 (AccessDenied "Request has expired.", Expires/ServerTime),
0002-00000007 (SecurityTokenExpired), 0002-00000002/4 (InvalidAccessKeyId),
0002-00000201 (V4 mismatch), 0002-00000209/210 (AdditionalHeaders),
0002-00000235 (x-oss-date ahead), 0003-00000301 ("Access denied by
authorizer's policy."), the PostObject error table (MalformedPOSTRequest,
InvalidPolicyDocument, "Invalid according to Policy: Policy expired." /
"...Policy Condition failed: [...]") and OSS's error-code list.  Guessed, not
documented: InvalidArgument for malformed signature parameters, the
credential-region check as AccessDenied, "Extra input fields" (S3's wording).
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, TypeAlias
from urllib.parse import quote

from broker.dev.emulators.sts import IssuedCredentials, StsEmulator
from broker.models import Clock

__all__ = [
    "OssError",
    "PostForm",
    "SignedRequest",
    "Verifier",
    "authenticate",
    "authenticate_post",
    "authorize",
]

_ALGORITHM: Final = "OSS4-HMAC-SHA256"
_UNSIGNED: Final = "UNSIGNED-PAYLOAD"
_TERMINATOR: Final = "aliyun_v4_request"
_STAMP: Final = "%Y%m%dT%H%M%SZ"
_MAX_EXPIRES_SECONDS: Final = 7 * 24 * 3600
_ROLE_ACCOUNT = re.compile(r"acs:ram::(?P<account>\d+):role/")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_V1_EXEMPT: Final = frozenset({"file", "policy", "signature", "ossaccesskeyid"})
_V4_EXEMPT: Final = frozenset({"file", "policy", "x-oss-signature"})
_V4_REQUIRED: Final = ("x-oss-signature-version", "x-oss-credential", "x-oss-date")

# fmt: off
_CATALOGUE: Final[Mapping[str, tuple[int, str]]] = {
    "AccessDenied": (403, "You have no right to access this object because of bucket acl."),
    "AccessForbidden": (403, "CORSResponse: This CORS request is not allowed. This is usually "
                        "because the evalution of Origin, request method / "
                        "Access-Control-Request-Method or Access-Control-Requet-Headers are not "
                        "whitelisted by the resource's CORS spec."),
    "BadDigest": (400, "The Content-MD5 you specified did not match what we received."),
    "EntityTooLarge": (400, "Your proposed upload exceeds the maximum allowed size."),
    "EntityTooSmall": (400, "Your proposed upload is smaller than the minimum allowed size."),
    "FileAlreadyExists": (409, "The object you specified already exists and can not be "
                          "overwritten."),
    "InvalidAccessKeyId": (403, "The OSS Access Key Id you provided does not exist in our "
                           "records."),
    "InvalidArgument": (400, "Invalid argument."),
    "InvalidDigest": (400, "The Content-MD5 you specified was invalid."),
    "InvalidObjectName": (400, "The specified object is not valid."),
    "InvalidPart": (400, "One or more of the specified parts could not be found or the specified "
                    "entity tag might not have matched the part's entity tag."),
    "InvalidPartOrder": (400, "The list of parts was not in ascending order. The parts list must "
                         "be specified in order by part number."),
    "InvalidPolicyDocument": (400, "Invalid Policy: Invalid JSON."),
    "MalformedPOSTRequest": (400, "The body of your POST request is not well-formed "
                             "multipart/form-data."),
    "MalformedXML": (400, "The XML you provided was not well-formed or did not validate against "
                     "our published schema."),
    "MethodNotAllowed": (405, "The specified method is not allowed against this resource."),
    "NoSuchBucket": (404, "The specified bucket does not exist."),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (404, "The specified upload does not exist. The upload ID may be invalid, or "
                     "the upload may have been aborted or completed."),
    "NotImplemented": (501, "A header you provided implies functionality that is not implemented."),
    "RequestTimeTooSkewed": (403, "The difference between the request time and the current time "
                             "is too large."),
    "SecurityTokenExpired": (403, "The security token you provided has expired."),
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the "
                              "signature you provided. Check your key and signing method."),
}
# fmt: on

_Details: TypeAlias = Mapping[str, "str | Mapping[str, str]"]


class OssError(Exception):
    """An OSS error answer: status, code and message from the catalogue, extra XML elements."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        ec: str = "",
        details: _Details | None = None,
    ) -> None:
        self.status, default = _CATALOGUE[code]
        self.code = code
        self.message = message or default
        self.ec = ec
        self.details: _Details = details or {}
        super().__init__(code)


def _invalid(message: str, ec: str = "") -> OssError:
    return OssError("InvalidArgument", message, ec=ec)


def _bad_policy(message: str, ec: str = "") -> OssError:
    return OssError("InvalidPolicyDocument", f"Invalid Policy: {message}", ec=ec)


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
class PostForm:
    """A PostObject form: its non-file fields (lower-case names) and the file part."""

    fields: Mapping[str, str]
    file_name: str
    file_content_type: str | None
    size: int

    @property
    def content_type(self) -> str:
        """The object's type: the ``Content-Type`` field, else the file part's own."""
        return self.fields.get("content-type") or self.file_content_type or ""


@dataclass(frozen=True)
class _Credential:
    access_key_id: str
    date: str
    region: str
    product: str

    @property
    def scope(self) -> str:
        return f"{self.date}/{self.region}/{self.product}/{_TERMINATOR}"


def authenticate(request: SignedRequest, verifier: Verifier) -> IssuedCredentials:
    """Check a V4 ``Authorization`` header or V4 query signature; the caller's credentials."""
    query = dict(request.query)
    if "x-oss-signature" in query or "x-oss-signature-version" in query:
        return _authenticate_query(request, query, verifier)
    authorization = request.headers.get("authorization")
    if authorization is None:
        raise OssError("AccessDenied")
    return _authenticate_header(request, authorization, verifier)


def _authenticate_query(
    request: SignedRequest, query: Mapping[str, str], verifier: Verifier
) -> IssuedCredentials:
    if query.get("x-oss-signature-version") != _ALGORITHM:
        raise _invalid("Unsupported x-oss-signature-version.")
    names = ("x-oss-credential", "x-oss-date", "x-oss-expires", "x-oss-signature")
    for name in names:
        if not query.get(name):
            raise _invalid(f"{name} is missing from the query string.")
    if len({name for name, _ in request.query}) != len(request.query):
        raise _invalid("A query parameter is repeated.")
    credential = _parse_credential(query["x-oss-credential"], verifier.region)
    signed_at = _parse_stamp(query["x-oss-date"], credential)
    expires = query["x-oss-expires"]
    if not expires.isdigit() or not 0 < int(expires) <= _MAX_EXPIRES_SECONDS:
        raise _invalid("x-oss-expires must be an integer in 1..604800.")
    _check_window(signed_at, int(expires), verifier)
    issued = _resolve(credential.access_key_id, query.get("x-oss-security-token"), verifier)
    additional = _additional_headers(query.get("x-oss-additional-headers"))
    _check_v4(
        request, credential, query["x-oss-date"], additional, query["x-oss-signature"], issued
    )
    return issued


def _authenticate_header(
    request: SignedRequest, authorization: str, verifier: Verifier
) -> IssuedCredentials:
    algorithm, _, rest = authorization.strip().partition(" ")
    if algorithm != _ALGORITHM:
        raise _invalid("Authorization: only OSS4-HMAC-SHA256 is supported.")
    parts = dict(item.strip().partition("=")[::2] for item in rest.split(","))
    if not parts.get("Credential") or not parts.get("Signature"):
        raise _invalid("Authorization: Credential and Signature are required.")
    if "AdditionalHeaders" in parts and not parts["AdditionalHeaders"]:
        raise _invalid(
            "Authorization: AdditionalHeaders is empty.",
            ec="0002-00000209",
        )
    stamp = request.headers.get("x-oss-date", "")
    credential = _parse_credential(parts["Credential"], verifier.region)
    signed_at = _parse_stamp(stamp, credential)
    if abs(verifier.clock() - signed_at) > verifier.max_skew_seconds:
        raise OssError("RequestTimeTooSkewed", ec="0002-00000504")
    _check_payload_hash(request)
    issued = _resolve(
        credential.access_key_id, request.headers.get("x-oss-security-token"), verifier
    )
    additional = _additional_headers(parts.get("AdditionalHeaders"))
    _check_v4(request, credential, stamp, additional, parts["Signature"], issued)
    return issued


def _parse_credential(raw: str, region: str) -> _Credential:
    """``<AccessKeyId>/<YYYYMMDD>/<region>/oss/aliyun_v4_request``, for this region."""
    pieces = raw.split("/")
    if len(pieces) != 5 or pieces[4] != _TERMINATOR or pieces[3] != "oss" or not pieces[0]:
        raise _invalid(
            "Credential must be <AccessKeyId>/<date>/<region>/oss/aliyun_v4_request.",
        )
    if pieces[2] != region:
        raise OssError(
            "AccessDenied", f"Invalid signing region in credential; expecting {region!r}."
        )
    return _Credential(*pieces[:4])


def _parse_stamp(stamp: str, credential: _Credential | None) -> float:
    """``x-oss-date`` (``YYYYMMDDTHHMMSSZ``) as epoch seconds; its day must be the scope's."""
    try:
        moment = datetime.strptime(stamp, _STAMP).replace(tzinfo=UTC)
    except ValueError:
        raise _invalid("x-oss-date must be in the form YYYYMMDDTHHMMSSZ.") from None
    if credential is not None and stamp[:8] != credential.date:
        raise _invalid("The credential date is not the day of x-oss-date.")
    return moment.timestamp()


def _check_window(signed_at: float, lifetime_seconds: int, verifier: Verifier) -> None:
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
        raise _invalid("Missing required header: x-oss-content-sha256.")
    if declared == _UNSIGNED:
        return
    if _HEX64.fullmatch(declared) is None or declared != hashlib.sha256(request.body).hexdigest():
        raise _invalid("x-oss-content-sha256 does not match the request body.")


def _additional_headers(raw: str | None) -> list[str]:
    """Lower-case, sorted, no empty or repeated names (OSS EC 0002-00000209/210)."""
    if raw is None:
        return []
    names = raw.split(";")
    if any(not name for name in names):
        raise _invalid("Additional headers contain an empty name.", ec="0002-00000210")
    if names != sorted({name.lower() for name in names}):
        raise _invalid("Additional headers must be lower-case, sorted, unique.")
    return names


def _check_v4(
    request: SignedRequest,
    credential: _Credential,
    stamp: str,
    additional: list[str],
    provided: str,
    issued: IssuedCredentials,
) -> None:
    canonical = _canonical_request(request, additional)
    digest = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    string_to_sign = f"{_ALGORITHM}\n{stamp}\n{credential.scope}\n{digest}"
    key = _signing_key(issued.access_key_secret, credential)
    expected = hmac.new(key, string_to_sign.encode("utf-8"), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, provided):
        details = _mismatch_details(credential.access_key_id, provided, string_to_sign)
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


def _signing_key(secret: str, credential: _Credential) -> bytes:
    key = ("aliyun_v4" + secret).encode("utf-8")
    for part in (credential.date, credential.region, credential.product, _TERMINATOR):
        key = hmac.new(key, part.encode("utf-8"), hashlib.sha256).digest()
    return key


def _mismatch_details(access_key_id: str, provided: str, string_to_sign: str) -> dict[str, str]:
    return {
        "OSSAccessKeyId": access_key_id,
        "SignatureProvided": provided,
        "StringToSign": string_to_sign,
        "StringToSignBytes": _hex_bytes(string_to_sign),
    }


def _resolve(access_key_id: str, token: str | None, verifier: Verifier) -> IssuedCredentials:
    """The STS credentials behind an access key id and its security token."""
    issued = verifier.sts.lookup_security_token(token) if token else None
    if issued is None or not hmac.compare_digest(issued.access_key_id, access_key_id):
        details = {"OSSAccessKeyId": access_key_id}
        ec = "0002-00000004" if token else "0002-00000002"
        raise OssError("InvalidAccessKeyId", ec=ec, details=details)
    if verifier.clock() >= issued.expires_at:
        raise OssError("SecurityTokenExpired", ec="0002-00000007")
    return issued


def authenticate_post(
    form: PostForm, bucket: str, verifier: Verifier, *, strict_fields: bool
) -> IssuedCredentials:
    """Check a PostObject form's signature, then its policy; the caller's credentials."""
    fields = form.fields
    if "policy" not in fields:
        raise _invalid(
            "Bucket POST must contain a field named 'policy'.",
            ec="0002-00000702",
        )
    if "x-oss-signature-version" in fields:
        issued = _post_v4(fields, verifier)
        exempt = _V4_EXEMPT
    elif "ossaccesskeyid" in fields or "signature" in fields:
        issued = _post_v1(fields, verifier)
        exempt = _V1_EXEMPT | {"x-oss-security-token"}
    else:
        raise OssError("AccessDenied")
    conditions = _policy_conditions(fields["policy"], verifier.clock())
    if "x-oss-signature-version" in fields:
        _require_v4_conditions(conditions)
    values = {**fields, "bucket": bucket, "content-type": form.content_type}
    covered = {_check_condition(condition, values, form.size) for condition in conditions}
    if strict_fields:
        extra = sorted(set(fields) - exempt - covered)
        if extra:
            message = f"Invalid according to Policy: Extra input fields: {', '.join(extra)}"
            raise OssError("AccessDenied", message)
    return issued


def _post_v4(fields: Mapping[str, str], verifier: Verifier) -> IssuedCredentials:
    if fields["x-oss-signature-version"] != _ALGORITHM:
        raise _invalid("Unsupported x-oss-signature-version.")
    for name in ("x-oss-credential", "x-oss-date", "x-oss-signature"):
        if not fields.get(name):
            raise _invalid(f"Bucket POST must contain a field named '{name}'.")
    credential = _parse_credential(fields["x-oss-credential"], verifier.region)
    _check_window(_parse_stamp(fields["x-oss-date"], credential), _MAX_EXPIRES_SECONDS, verifier)
    issued = _resolve(credential.access_key_id, fields.get("x-oss-security-token"), verifier)
    policy = fields["policy"]
    key = _signing_key(issued.access_key_secret, credential)
    expected = hmac.new(key, policy.encode("utf-8"), hashlib.sha256).hexdigest()
    provided = fields["x-oss-signature"]
    if not hmac.compare_digest(expected, provided):
        details = _mismatch_details(credential.access_key_id, provided, policy)
        raise OssError("SignatureDoesNotMatch", ec="0002-00000201", details=details)
    return issued


def _post_v1(fields: Mapping[str, str], verifier: Verifier) -> IssuedCredentials:
    access_key_id = fields.get("ossaccesskeyid", "")
    provided = fields.get("signature", "")
    if not access_key_id or not provided:
        raise _invalid("Bucket POST needs OSSAccessKeyId, policy and Signature.")
    issued = _resolve(access_key_id, fields.get("x-oss-security-token"), verifier)
    policy = fields["policy"]
    digest = hmac.new(issued.access_key_secret.encode(), policy.encode("utf-8"), hashlib.sha1)
    expected = base64.b64encode(digest.digest()).decode()
    if not hmac.compare_digest(expected, provided):
        details = _mismatch_details(access_key_id, provided, policy)
        raise OssError("SignatureDoesNotMatch", ec="0002-00000040", details=details)
    return issued


def _policy_conditions(encoded: str, now: float) -> list[Any]:
    """Decode the base64 JSON policy, check ``expiration``; its ``conditions``."""
    try:
        document = json.loads(base64.b64decode(encoded, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise _bad_policy("Invalid JSON.") from None
    if not isinstance(document, dict):
        raise _bad_policy("Invalid JSON.")
    expiration, conditions = document.get("expiration"), document.get("conditions")
    if not isinstance(conditions, list):
        raise _bad_policy("Policy must contain conditions.")
    if now > _parse_expiration(expiration):
        raise OssError("AccessDenied", "Invalid according to Policy: Policy expired.")
    return conditions


def _parse_expiration(value: object) -> float:
    """ISO 8601 in GMT, ``2014-12-01T12:00:00.000Z``."""
    if not isinstance(value, str) or not value.endswith("Z"):
        raise _bad_policy(f"Invalid 'expiration' value: {value!r}.")
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise _bad_policy(f"Invalid 'expiration' value: {value!r}.") from None


def _require_v4_conditions(conditions: list[Any]) -> None:
    named = {_condition_field(condition) for condition in conditions}
    for name in _V4_REQUIRED:
        if name not in named:
            raise _bad_policy(f"{name} must be in the conditions.")


def _condition_field(condition: object) -> str | None:
    if isinstance(condition, dict) and len(condition) == 1:
        return str(next(iter(condition))).lower()
    if isinstance(condition, list) and len(condition) == 3 and isinstance(condition[1], str):
        return condition[1].removeprefix("$").lower()
    return None


def _check_condition(condition: object, values: Mapping[str, str], size: int) -> str:
    """Enforce one condition; the form field it covers."""
    if isinstance(condition, dict):
        if len(condition) != 1:
            raise _bad_policy(
                "Invalid Simple-Condition: Simple-Conditions must have exactly one property "
                "specified.",
            )
        ((name, expected),) = condition.items()
        condition = ["eq", f"${name}", expected]
    if not isinstance(condition, list) or len(condition) != 3:
        raise _bad_policy(f"Invalid Condition: {condition!r}.")
    operator, subject, operand = condition
    if operator == "content-length-range":
        _check_length(subject, operand, size)
        return "content-length"
    if not isinstance(subject, str) or not subject.startswith("$"):
        raise _bad_policy(f"Invalid Condition: {condition!r}.")
    name = subject[1:].lower()
    if not _condition_holds(operator, values.get(name, ""), operand):
        failed = json.dumps(condition)
        raise OssError(
            "AccessDenied", f"Invalid according to Policy: Policy Condition failed: {failed}"
        )
    return name


def _condition_holds(operator: object, value: str, operand: object) -> bool:
    if operator == "eq" and isinstance(operand, str):
        return value == operand
    if operator == "starts-with" and isinstance(operand, str):
        return value.startswith(operand)
    if operator in {"in", "not-in"} and isinstance(operand, list):
        found = value in [str(item) for item in operand]
        return found if operator == "in" else not found
    raise _bad_policy(
        f"Invalid Condition operator {operator!r}.",
        ec="0006-00000224",
    )


def _check_length(low: object, high: object, size: int) -> None:
    if isinstance(low, bool) or isinstance(high, bool):
        raise _bad_policy("content-length-range needs two integers.")
    if not isinstance(low, int) or not isinstance(high, int):
        raise _bad_policy("content-length-range needs two integers.")
    if size < low:
        raise OssError("EntityTooSmall")
    if size > high:
        raise OssError("EntityTooLarge")


def authorize(
    issued: IssuedCredentials, action: str, bucket: str, key: str | None, region: str
) -> None:
    """Raise AccessDenied unless the token's inline policy allows ``action`` on the object.

    Without an inline policy the token has its role's permissions, which the
    emulator does not model: it allows.  A statement with a ``Condition`` is
    not evaluated: as an Allow it never applies, as a Deny it always does.
    """
    if not issued.policy:
        return
    match = _ROLE_ACCOUNT.match(issued.role_arn)
    account = match["account"] if match else "0"
    resource = f"acs:oss:{region}:{account}:{bucket}" + ("" if key is None else f"/{key}")
    statements = json.loads(issued.policy).get("Statement", [])
    effects = {s.get("Effect") for s in statements if _applies(s, action, resource)}
    if "Deny" in effects or "Allow" not in effects:
        kind = "ExplicitDeny" if "Deny" in effects else "ImplicitDeny"
        detail = {"AuthAction": action, "NoPermissionType": kind}
        raise OssError(
            "AccessDenied",
            "Access denied by authorizer's policy.",
            ec="0003-00000301",
            details={"AccessDeniedDetail": detail},
        )


def _applies(statement: Mapping[str, Any], action: str, resource: str) -> bool:
    if "Condition" in statement:
        return bool(statement.get("Effect") == "Deny")
    return _matches(statement, "Action", action, ignore_case=True) and _matches(
        statement, "Resource", resource, ignore_case=False
    )


def _matches(statement: Mapping[str, Any], element: str, value: str, *, ignore_case: bool) -> bool:
    """``Action``/``Resource`` match, or ``NotAction``/``NotResource`` does not."""
    negated = f"Not{element}" in statement
    patterns = statement.get(f"Not{element}" if negated else element, [])
    if isinstance(patterns, str):
        patterns = [patterns]
    found = any(_wildcard(str(p), ignore_case).fullmatch(value) for p in patterns)
    return found != negated


@functools.lru_cache(maxsize=256)
def _wildcard(pattern: str, ignore_case: bool) -> re.Pattern[str]:
    """RAM wildcards: ``*`` any run of characters, ``?`` one character."""
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(regex, re.DOTALL | (re.IGNORECASE if ignore_case else 0))


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def _hex_bytes(text: str) -> str:
    return " ".join(f"{byte:02X}" for byte in text.encode("utf-8"))
