"""RAM inline policies for OSS (policy grammar Version "1"), minified as STS receives them."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

__all__ = ["MAX_POLICY_CHARS", "oss_policy_document"]

MAX_POLICY_CHARS = 2048
"""STS rejects an AssumeRole ``Policy`` longer than this."""

# Object actions share one statement on ``<bucket>/<prefix>*``, in this order.
# InitiateMultipartUpload, UploadPart and CompleteMultipartUpload are all
# authorised by oss:PutObject in RAM.
_OBJECT_ACTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "put": ("oss:PutObject",),
        "multipart": ("oss:PutObject", "oss:AbortMultipartUpload", "oss:ListParts"),
        "get": ("oss:GetObject",),
        "delete": ("oss:DeleteObject",),
    }
)


def oss_policy_document(bucket: str, actions: Iterable[str], prefix: str) -> str:
    """The minified policy allowing ``actions`` (put, multipart, get, list, delete) in ``prefix``.

    ``prefix`` is used as given: checking it is the caller's job (``broker.policies``).
    """
    return json.dumps(_document(bucket, actions, prefix), separators=(",", ":"), ensure_ascii=True)


def _document(bucket: str, actions: Iterable[str], prefix: str) -> dict[str, Any]:
    """The RAM policy (grammar Version "1") as data; serialised by ``oss_policy_document`` only."""
    wanted = set(actions)
    object_actions = dict.fromkeys(
        ram for name, mapped in _OBJECT_ACTIONS.items() if name in wanted for ram in mapped
    )
    statements: list[dict[str, Any]] = []
    if object_actions:
        resource = f"acs:oss:*:*:{bucket}/{prefix}*"
        statements.append({"Effect": "Allow", "Action": [*object_actions], "Resource": [resource]})
    if "list" in wanted:
        only_prefix = {"StringLike": {"oss:Prefix": [f"{prefix}*"]}}
        statements.append(
            {
                "Effect": "Allow",
                "Action": ["oss:ListObjects"],
                "Resource": [f"acs:oss:*:*:{bucket}"],
                "Condition": only_prefix,
            }
        )
    return {"Version": "1", "Statement": statements}
