"""The OSS emulator's errors: OSS's codes, HTTP statuses and messages, extra elements, ECs.

Codes, messages and ECs come from the OSS docs: "Troubleshoot signature errors"
(SignatureDoesNotMatch and its StringToSign/CanonicalRequest elements; V1 EC
0002-00000040, https://help.aliyun.com/knowledge_detail/108790.html), the EC
pages 0002-00000069 (AccessDenied "Request has expired.", Expires/ServerTime),
0002-00000007 (SecurityTokenExpired), 0002-00000002/4 (InvalidAccessKeyId),
0002-00000201 (V4 mismatch), 0002-00000705 (PostObject V1 mismatch),
0002-00000209/210 (AdditionalHeaders), 0002-00000235 (x-oss-date ahead),
0003-00000301 ("Access denied by authorizer's policy."), 0017-00000279 and
0006-00000117 (x-oss-forbid-overwrite neither true nor false), 0042-00000214
(CompleteMultipartUpload onto an existing key under x-oss-forbid-overwrite), 0006-00000226
(a field a PostObject condition names is missing), the PostObject error table
(MalformedPOSTRequest, InvalidPolicyDocument, "Invalid according to Policy:
Policy expired." / "...Policy Condition failed: [...]"), the callback pages
(203 CallbackFailed, the object stored) and OSS's error-code list
(NotImplemented, 501).  Guessed, not documented: InvalidArgument for malformed
signature parameters, the credential-region check as AccessDenied, the V1
"requires a valid Date" message.  ``oss_xml.error_response`` writes them as
OSS's ``<Error>`` XML.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final, TypeAlias

__all__ = ["Details", "OssError", "invalid_argument", "invalid_policy"]

# fmt: off
_CATALOGUE: Final[Mapping[str, tuple[int, str]]] = {
    "AccessDenied": (403, "You have no right to access this object because of bucket acl."),
    "AccessForbidden": (403, "CORSResponse: This CORS request is not allowed. This is usually "
                        "because the evalution of Origin, request method / "
                        "Access-Control-Request-Method or Access-Control-Requet-Headers are not "
                        "whitelisted by the resource's CORS spec."),
    "BadDigest": (400, "The Content-MD5 you specified did not match what we received."),
    "CallbackFailed": (203, "Error status : -1. The OSS emulator does not call callback servers."),
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

Details: TypeAlias = Mapping[str, "str | Mapping[str, str]"]


class OssError(Exception):
    """An OSS error answer: status, code and message from the catalogue, extra XML elements."""

    def __init__(
        self,
        code: str,
        message: str | None = None,
        *,
        ec: str = "",
        details: Details | None = None,
    ) -> None:
        self.status, default = _CATALOGUE[code]
        self.code = code
        self.message = message or default
        self.ec = ec
        self.details: Details = details or {}
        super().__init__(code)


def invalid_argument(message: str, ec: str = "") -> OssError:
    """``InvalidArgument`` with ``message``."""
    return OssError("InvalidArgument", message, ec=ec)


def invalid_policy(message: str, ec: str = "") -> OssError:
    """``InvalidPolicyDocument`` (a PostObject policy) with ``Invalid Policy: <message>``."""
    return OssError("InvalidPolicyDocument", f"Invalid Policy: {message}", ec=ec)
