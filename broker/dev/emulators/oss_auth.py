"""Which signature a request carries, checked by ``oss_signature`` (V4) or ``oss_signature_v1``.

URL signatures first (``x-oss-signature*`` is V4, ``OSSAccessKeyId``/``Signature``
is V1), then the ``Authorization`` header's scheme (``OSS4-HMAC-SHA256`` V4,
``OSS`` V1; ``OSS2``, signature V2, is real but not emulated).  No signature at
all is an anonymous request, which a private bucket refuses with OSS's
"bucket acl" AccessDenied.
"""

from __future__ import annotations

from broker.dev.emulators.oss_errors import OssError, invalid_argument
from broker.dev.emulators.oss_signature import (
    ALGORITHM,
    SignedRequest,
    Verifier,
    authenticate_v4_header,
    authenticate_v4_query,
)
from broker.dev.emulators.oss_signature_v1 import authenticate_v1_header, authenticate_v1_query
from broker.dev.emulators.sts import IssuedCredentials

__all__ = ["authenticate"]


def authenticate(request: SignedRequest, verifier: Verifier) -> IssuedCredentials:
    """The STS credentials that signed ``request``, whichever OSS signature it carries."""
    query = dict(request.query)
    if "x-oss-signature" in query or "x-oss-signature-version" in query:
        return authenticate_v4_query(request, query, verifier)
    if "Signature" in query or "OSSAccessKeyId" in query:
        return authenticate_v1_query(request, query, verifier)
    authorization = request.headers.get("authorization")
    if authorization is None:
        raise OssError("AccessDenied")
    scheme = authorization.strip().partition(" ")[0]
    if scheme == ALGORITHM:
        return authenticate_v4_header(request, authorization, verifier)
    if scheme == "OSS":
        return authenticate_v1_header(request, authorization, verifier)
    if scheme == "OSS2":
        raise OssError("NotImplemented", "Signature V2 (OSS2) is not emulated; use V1 or V4.")
    raise invalid_argument("Authorization must be OSS4-HMAC-SHA256 ... or OSS <id>:<signature>.")
