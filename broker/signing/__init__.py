"""OSS request signing as pure functions of (credentials, request, signing time).

Nothing here reads the clock or does I/O.  ``v4`` presigns URLs and signs
headers (byte-identical to the official ``alibabacloud_oss_v2`` SDK),
``post_policy`` signs PostObject forms (V4, or V1 for old clients), and
``endpoints`` says where a bucket's URLs point.  Call sites use the package:
``from broker import signing; signing.presign(...)``.
"""

from __future__ import annotations

from broker.signing.endpoints import Addressing, OssEndpoint, bucket_url
from broker.signing.post_policy import post_policy_v1, post_policy_v4
from broker.signing.v4 import (
    ALGORITHM,
    MAX_EXPIRES_SECONDS,
    PresignedUrl,
    PresignInput,
    PresignPlan,
    authorization_v4,
    presign,
    presign_plan,
    presign_planned,
    signing_key,
)

__all__ = [
    "ALGORITHM",
    "MAX_EXPIRES_SECONDS",
    "Addressing",
    "OssEndpoint",
    "PresignInput",
    "PresignPlan",
    "PresignedUrl",
    "authorization_v4",
    "bucket_url",
    "post_policy_v1",
    "post_policy_v4",
    "presign",
    "presign_plan",
    "presign_planned",
    "signing_key",
]
