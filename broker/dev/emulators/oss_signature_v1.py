"""OSS signature V1 in the emulator: ``Authorization: OSS <id>:<sig>`` and signed URLs.

V1 is still the default of ``oss2``'s ``StsAuth`` and of ``ali-oss``, and real
OSS still accepts it.  Verified exactly as the official clients compute it:

- ``oss2/auth.py`` ``ProviderAuth`` (``_sign_request``, ``_sign_url``,
  ``__get_bytes_to_sign``, ``_subresource_key_set``);
- ``alibabacloud_oss_v2/signer/v1.py`` ``SignerV1._calc_string_to_sign``;
- ``ali-oss@6.23.0`` ``lib/common/signUtils.js`` ``buildCanonicalString`` and
  ``_signatureForURL``, ``lib/common/utils/createRequest.js``;
- OSS's "Include a V1 signature in the Authorization header / in a URL" pages
  and "Troubleshoot signature errors"
  (https://help.aliyun.com/knowledge_detail/108790.html: SignatureDoesNotMatch
  with OSSAccessKeyId, SignatureProvided, StringToSign, StringToSignBytes, EC
  0002-00000040).

StringToSign = VERB "\\n" Content-MD5 "\\n" Content-Type "\\n" Date "\\n"
CanonicalizedOSSHeaders CanonicalizedResource, and the signature is
base64(HMAC-SHA1(AccessKeySecret, StringToSign)).  Date is ``x-oss-date`` if
sent, else ``Date`` (header auth), or ``Expires`` (URL auth).  The
canonicalized headers are every ``x-oss-*`` header, lower-case, sorted,
``name:value\\n`` (so ``x-oss-security-token`` is signed in header auth).  The
canonicalized resource is ``/<bucket>/<key>`` (``/<bucket>/`` for bucket
operations, the key not URL-encoded) plus the sub-resources present, sorted,
``name=value`` or just ``name`` when empty; in URL auth ``security-token``
is such a sub-resource.  Other query parameters are not signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import Final

from broker.dev.emulators.oss_errors import OssError, invalid_argument
from broker.dev.emulators.oss_signature import (
    SignedRequest,
    Verifier,
    check_window,
    mismatch_details,
    resolve,
)
from broker.dev.emulators.sts import IssuedCredentials

__all__ = ["SUBRESOURCES", "authenticate_v1_header", "authenticate_v1_query", "string_to_sign"]

# The union of the sub-resource sets of oss2 (ProviderAuth._subresource_key_set),
# alibabacloud-oss-v2 (SignerV1._subresource_key_set) and the Go SDK v2
# (oss/signer/v1.go requiredSignedParametersMap): each client signs the ones
# it sends, so the server must canonicalize all of them.
# fmt: off
SUBRESOURCES: Final = frozenset({
    "accessPoint", "accessPointPolicy", "acl", "append", "asyncFetch",
    "bucketArchiveDirectRead", "bucketInfo", "callback", "callback-var", "cloudboxes", "cname",
    "comp", "continuation-token", "cors", "delete", "encryption", "endTime", "group",
    "httpsConfig", "inventory", "inventoryId", "lifecycle", "link", "live", "location",
    "logging", "metaQuery", "objectInfo", "objectMeta", "partNumber", "policy", "position",
    "publicAccessBlock", "qos", "qosInfo", "qosRequester", "redundancyTransition", "referer",
    "regionList", "replication", "replicationLocation", "replicationProgress",
    "requesterQosInfo", "requestPayment", "resourceGroup", "resourcePool",
    "resourcePoolBuckets", "resourcePoolInfo", "response-cache-control",
    "response-content-disposition", "response-content-encoding", "response-content-language",
    "response-content-type", "response-expires", "restore", "security-token", "sequential",
    "startTime", "stat", "status", "style", "styleName", "symlink", "tagging",
    "transferAcceleration", "uploadId", "uploads", "versionId", "versioning", "versions", "vod",
    "website", "worm", "wormExtend", "wormId", "x-oss-ac-forward-allow", "x-oss-ac-source-ip",
    "x-oss-ac-subnet-mask", "x-oss-ac-vpc-id", "x-oss-access-point-name",
    "x-oss-async-process", "x-oss-process", "x-oss-redundancy-transition-taskid",
    "x-oss-request-payer", "x-oss-target-redundancy-type", "x-oss-traffic-limit",
    "x-oss-write-get-object-response",
})
# fmt: on
_QUERY_AUTH: Final = ("OSSAccessKeyId", "Expires", "Signature")
_MISMATCH_EC: Final = "0002-00000040"


def authenticate_v1_header(
    request: SignedRequest, authorization: str, verifier: Verifier
) -> IssuedCredentials:
    """Check ``Authorization: OSS <AccessKeyId>:<Signature>``; the caller's credentials."""
    credential = authorization.strip()[len("OSS ") :]
    access_key_id, colon, provided = credential.rpartition(":")
    if not colon or not access_key_id or not provided:
        raise invalid_argument("Authorization must be OSS <AccessKeyId>:<Signature>.")
    date = request.headers.get("x-oss-date") or request.headers.get("date")
    if not date:
        raise OssError("AccessDenied", "OSS authentication requires a valid Date.")
    if abs(verifier.clock() - _http_date(date)) > verifier.max_skew_seconds:
        raise OssError("RequestTimeTooSkewed")
    token = request.headers.get("x-oss-security-token")
    issued = resolve(access_key_id, token, verifier)
    _check_v1(request, date, access_key_id, provided, issued)
    return issued


def authenticate_v1_query(
    request: SignedRequest, query: Mapping[str, str], verifier: Verifier
) -> IssuedCredentials:
    """Check ``OSSAccessKeyId``/``Expires``/``Signature`` (+ ``security-token``) in the URL."""
    for name in _QUERY_AUTH:
        if not query.get(name):
            raise invalid_argument(f"{name} is missing from the query string.")
    if len({name for name, _ in request.query}) != len(request.query):
        raise invalid_argument("A query parameter is repeated.")
    expires = query["Expires"]
    if not expires.isdigit():
        raise invalid_argument("Expires must be a whole number of seconds since the epoch.")
    check_window(0.0, int(expires), verifier)  # valid from the epoch until Expires
    issued = resolve(query["OSSAccessKeyId"], query.get("security-token"), verifier)
    _check_v1(request, expires, query["OSSAccessKeyId"], query["Signature"], issued)
    return issued


def string_to_sign(request: SignedRequest, date: str) -> str:
    """The V1 StringToSign of ``request`` with ``date`` (Date, x-oss-date or Expires)."""
    headers = request.headers
    signed = sorted(name for name in headers if name.startswith("x-oss-"))
    canonical_headers = "".join(f"{name}:{headers[name].strip()}\n" for name in signed)
    resource = "/" if request.bucket is None else f"/{request.bucket}/{request.key or ''}"
    subresources = sorted((n, v) for n, v in request.query if n in SUBRESOURCES)
    if subresources:
        resource += "?" + "&".join(f"{n}={v}" if v else n for n, v in subresources)
    lines = [request.method, headers.get("content-md5", ""), headers.get("content-type", ""), date]
    return "\n".join(lines) + "\n" + canonical_headers + resource


def _check_v1(
    request: SignedRequest,
    date: str,
    access_key_id: str,
    provided: str,
    issued: IssuedCredentials,
) -> None:
    text = string_to_sign(request, date)
    digest = hmac.new(issued.access_key_secret.encode(), text.encode("utf-8"), hashlib.sha1)
    expected = base64.b64encode(digest.digest()).decode()
    if not hmac.compare_digest(expected.encode(), provided.encode()):
        details = mismatch_details(access_key_id, provided, text)
        raise OssError("SignatureDoesNotMatch", ec=_MISMATCH_EC, details=details)


def _http_date(value: str) -> float:
    """An RFC 1123 date (``Wed, 28 Dec 2022 10:27:41 GMT``) as epoch seconds."""
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        raise OssError("AccessDenied", "OSS authentication requires a valid Date.") from None
    if moment.tzinfo is None:
        raise OssError("AccessDenied", "OSS authentication requires a valid Date.")
    return moment.timestamp()
