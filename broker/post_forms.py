"""PostObject forms: the conditions a form policy carries and the fields it pins.

``post_policy_conditions`` turns a ``POST /v1/post-policy`` body, the policy
and the caller's prefix into the policy's conditions and the form fields that
satisfy them; ``broker.vending`` signs them with ``broker.signing``.  Pure
rules, no I/O, like ``broker.uploads`` whose checks they share.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from broker.errors import AccessDenied, RequestInvalid
from broker.policies import Policy
from broker.uploads import (
    MAX_SINGLE_UPLOAD_BYTES,
    PostPolicyBody,
    callback_header,
    check_content_type,
    check_key,
)

__all__ = ["PostForm", "pinned_post_fields", "post_policy_conditions"]


@dataclass(frozen=True, slots=True)
class PostForm:
    """The conditions of a PostObject policy and the form fields that satisfy them."""

    conditions: list[Any]
    fields: dict[str, str]


def post_policy_conditions(body: PostPolicyBody, policy: Policy, prefix: str) -> PostForm:
    """Conditions for ``key``/``key_prefix``, size, Content-Type, success status, pinned fields.

    ``key_prefix`` may only narrow the caller's prefix and ``max_object_bytes``
    may only lower the policy's; without either limit OSS's 5 GiB applies.
    Every security-relevant field is pinned (``pinned_post_fields``).
    """
    key_condition, key_field = _key_condition(body, prefix)
    conditions: list[Any] = [key_condition]
    fields = {"key": key_field}
    conditions.append(["content-length-range", 0, _size_limit(body, policy)])
    check_content_type(policy, body.content_type, required=True)
    if body.content_type is not None:
        conditions.append(["eq", "$Content-Type", body.content_type])
        fields["Content-Type"] = body.content_type
    if body.success_action_status is not None:
        status = str(body.success_action_status)
        conditions.append({"success_action_status": status})
        fields["success_action_status"] = status
    for name, value in pinned_post_fields(body, policy).items():
        conditions.append(["eq", f"${name}", value])
        fields[name] = value
    return PostForm(conditions, fields)


def _key_condition(body: PostPolicyBody, prefix: str) -> tuple[list[str], str]:
    """``eq`` an exact key, or ``starts-with`` a prefix (the caller's, or narrower)."""
    if body.key is not None and body.key_prefix is not None:
        raise RequestInvalid("give key or key_prefix, not both")
    if body.key is not None:
        key = check_key(body.key, prefix)
        return ["eq", "$key", key], key
    key_prefix = body.key_prefix if body.key_prefix is not None else prefix
    if key_prefix != prefix:
        check_key(key_prefix, prefix)
    return ["starts-with", "$key", key_prefix], key_prefix + "${filename}"


def pinned_post_fields(body: PostPolicyBody, policy: Policy) -> dict[str, str]:
    """The form fields a browser may not choose, each with the one value the policy allows.

    OSS ACCEPTS form fields that no condition names: the valid request on
    https://help.aliyun.com/en/oss/user-guide/0006-00000201 carries
    ``success_action_status``, ``Content-Disposition`` and ``x-oss-meta-*``
    fields its policy never mentions.  So a field left out of the conditions
    is the browser's to set, and a browser could add its own ``callback``
    (around the ``callback_urls`` allowlist), make the object public with
    ``x-oss-object-acl`` or drop ``x-oss-forbid-overwrite``.  A presigned URL
    allows none of that (every ``x-oss-*`` header is signed), so each of these
    fields gets an ``eq`` condition here, and the broker returns its value.

    A field a condition names MUST be in the form
    (https://help.aliyun.com/en/oss/user-guide/0006-00000226), so a policy
    cannot say "absent".  "No callback" and "no redirect" are therefore pinned
    to the empty value, which names no URL: OSS has nothing to call or
    redirect to (S3, whose POST form OSS follows, "acts as if the field is not
    present" when it cannot interpret the redirect URL:
    https://docs.aws.amazon.com/AmazonS3/latest/API/RESTObjectPOST.html), and
    should OSS instead refuse an empty field, the upload fails closed.  Either
    way a browser can never substitute a value of its own.
    """
    callback = "" if body.callback is None else callback_header(policy, body.callback)
    return {
        # "default": the object inherits the bucket's ACL, as with a presigned PUT.
        "x-oss-object-acl": "default",
        "x-oss-forbid-overwrite": _forbid_overwrite(body, policy),
        "success_action_redirect": "",
        "callback": callback,
    }


def _forbid_overwrite(body: PostPolicyBody, policy: Policy) -> str:
    """The body's choice, unless the policy's ``forbid_overwrite`` decides: then ``true``."""
    if not policy.forbid_overwrite:
        return "true" if body.forbid_overwrite else "false"
    if body.forbid_overwrite is False:
        raise AccessDenied(f"policy {policy.name} forbids overwriting objects")
    return "true"


def _size_limit(body: PostPolicyBody, policy: Policy) -> int:
    limit = policy.max_object_bytes or MAX_SINGLE_UPLOAD_BYTES
    if body.max_object_bytes is None:
        return limit
    if body.max_object_bytes > limit:
        raise RequestInvalid(f"max_object_bytes may only lower the policy's limit of {limit}")
    return body.max_object_bytes
