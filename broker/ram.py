"""RAM inline policies for OSS (policy grammar Version "1"), minified as STS receives them.

A document is built from grants (``RamGrant``), never by pasting strings: each
grant becomes at most two statements, object actions on
``<bucket>/<prefix>*`` (or on exactly ``<bucket>/<key>``) and
``oss:ListObjects`` on the bucket held to the prefix by ``oss:Prefix``; the
grant's conditions go into both.  Checking prefixes, keys and values is the
caller's job (``broker.scopes``): this module writes what it is given.

Condition keys, spelled as Alibaba spells them (RAM "Policy elements:
Condition", https://www.alibabacloud.com/help/en/ram/policy-elements, and OSS
"Policy syntax and elements",
https://www.alibabacloud.com/help/en/oss/user-guide/authorization-syntax-and-elements):

* ``acs:CurrentTime`` with ``DateLessThan``: the time of the request, before a
  deadline in ISO 8601 (``2026-11-21T05:00:00Z``, UTC; RAM "Access Alibaba
  Cloud in a specified period of time",
  https://www.alibabacloud.com/help/en/ram/user-guide/access-alibaba-cloud-in-a-specified-period-of-time).
  Added by ``with_deadline`` when STS is called, not before, so the deadline
  counts from the fetch.
* ``acs:SourceIp`` with ``IpAddress``: the client's address, or a network.
* ``acs:SourceVpc`` with ``StringEquals``: the VPC a request came through.
* ``acs:SecureTransport`` with ``Bool`` ``"true"``: HTTPS only.

Several conditions in one statement must all hold; several values of one key:
any one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

__all__ = [
    "CURRENT_TIME",
    "DEADLINE_SAMPLE",
    "MAX_POLICY_CHARS",
    "SECURE_TRANSPORT",
    "SOURCE_IP",
    "SOURCE_VPC",
    "Budget",
    "Condition",
    "RamGrant",
    "grant_chars",
    "measure",
    "oss_policy_document",
    "with_deadline",
]

MAX_POLICY_CHARS = 2048
"""STS rejects an AssumeRole ``Policy`` longer than this."""

CURRENT_TIME = "acs:CurrentTime"
SOURCE_IP = "acs:SourceIp"
SOURCE_VPC = "acs:SourceVpc"
SECURE_TRANSPORT = "acs:SecureTransport"

DEADLINE_SAMPLE = "2026-11-21T05:00:00Z"
"""A deadline as ``with_deadline`` writes it: every one has exactly this length."""

Condition = tuple[str, str, str | tuple[str, ...]]
"""``(operator, key, value)``: a tuple value is written as a JSON list, a string as is."""

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


@dataclass(frozen=True, slots=True)
class RamGrant:
    """What one grant allows, rendered: a bucket, a prefix (or one key), actions, conditions.

    ``prefix`` ends in ``/``; with ``key`` (under ``prefix``) the grant covers
    that one object and never lists.
    """

    bucket: str
    prefix: str
    actions: tuple[str, ...]
    key: str | None = None
    conditions: tuple[Condition, ...] = ()


def oss_policy_document(grants: Iterable[RamGrant]) -> str:
    """The minified policy allowing what ``grants`` allow (and nothing else)."""
    statements = [statement for grant in grants for statement in _statements(grant)]
    return _dump({"Version": "1", "Statement": statements})


def grant_chars(grant: RamGrant) -> int:
    """How many characters ``grant``'s statements take in a document (without separators)."""
    return len(",".join(_dump(statement) for statement in _statements(grant)))


@dataclass(frozen=True, slots=True)
class Budget:
    """How many of STS's 2,048 characters a document takes: each grant's share and the total."""

    grants: tuple[int, ...]
    total: int

    @property
    def envelope(self) -> int:
        """What is not any grant's: ``{"Version":"1","Statement":[...]}`` and the commas."""
        return self.total - sum(self.grants)


def measure(grants: Sequence[RamGrant], *, deadline: bool = False) -> Budget:
    """The budget of ``grants``' document; with ``deadline``, as ``with_deadline`` makes it."""
    if deadline:
        until: Condition = ("DateLessThan", CURRENT_TIME, DEADLINE_SAMPLE)
        grants = [replace(grant, conditions=(*grant.conditions, until)) for grant in grants]
    return Budget(tuple(grant_chars(g) for g in grants), len(oss_policy_document(grants)))


def with_deadline(document: str, deadline: str) -> str:
    """``document`` with ``DateLessThan`` ``acs:CurrentTime`` ``deadline`` in every Allow.

    ``deadline`` is ISO 8601 UTC to the second (``2026-11-21T05:00:00Z``), so
    the result is as long as it is with ``DEADLINE_SAMPLE``.  Sources: RAM
    "Access Alibaba Cloud in a specified period of time",
    https://www.alibabacloud.com/help/en/ram/user-guide/access-alibaba-cloud-in-a-specified-period-of-time
    (the key ``acs:CurrentTime``, the operator ``DateLessThan``, the time in
    ISO 8601 with its offset: ``Z`` is UTC's); RAM policy elements,
    https://www.alibabacloud.com/help/doc-detail/93738.htm (``Condition``
    holds it); OSS honours such an expiry in RAM policies and bucket policies
    alike, https://help.aliyun.com/en/oss/user-guide/policy-statement-expiration.
    """
    data = json.loads(document)
    for statement in data["Statement"]:
        if statement.get("Effect") == "Allow":
            block = statement.setdefault("Condition", {})
            block.setdefault("DateLessThan", {})[CURRENT_TIME] = deadline
    return _dump(data)


def _dump(data: object) -> str:
    return json.dumps(data, separators=(",", ":"), ensure_ascii=True)


def _statements(grant: RamGrant) -> list[dict[str, Any]]:
    """The RAM statements of one grant, as data; serialised by ``_dump`` only."""
    wanted = set(grant.actions)
    object_actions = dict.fromkeys(
        ram for name, mapped in _OBJECT_ACTIONS.items() if name in wanted for ram in mapped
    )
    statements: list[dict[str, Any]] = []
    if object_actions:
        target = grant.key if grant.key is not None else f"{grant.prefix}*"
        resource = f"acs:oss:*:*:{grant.bucket}/{target}"
        statement = {"Effect": "Allow", "Action": [*object_actions], "Resource": [resource]}
        statements.append(_with_conditions(statement, grant.conditions))
    if "list" in wanted and grant.key is None:
        only_prefix: Condition = ("StringLike", "oss:Prefix", (f"{grant.prefix}*",))
        statement = {
            "Effect": "Allow",
            "Action": ["oss:ListObjects"],
            "Resource": [f"acs:oss:*:*:{grant.bucket}"],
        }
        statements.append(_with_conditions(statement, (only_prefix, *grant.conditions)))
    return statements


def _with_conditions(statement: dict[str, Any], conditions: Sequence[Condition]) -> dict[str, Any]:
    if not conditions:
        return statement
    block: dict[str, dict[str, Any]] = {}
    for operator, key, value in conditions:
        keys = block.setdefault(operator, {})
        if key in keys:
            raise ValueError(f"condition {operator} {key} is given twice")
        keys[key] = list(value) if isinstance(value, tuple) else value
    return {**statement, "Condition": block}
