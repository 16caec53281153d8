"""PostObject in the OSS emulator: read the form, check its signature and policy, answer.

From OSS's "PostObject", "POST V4 signature" and "POST V1 signature" pages: V4
signs the base64 policy with the V4 signing key (hex), V1 with HMAC-SHA1 of
the secret (base64); the policy's ``expiration`` and every condition
(``eq``, ``starts-with``, ``in``, ``not-in``, ``content-length-range``) are
enforced; ``file`` must be the form's last field.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final
from urllib.parse import quote

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from broker.dev.emulators.oss_errors import OssError, invalid_argument, invalid_policy
from broker.dev.emulators.oss_signature import (
    ALGORITHM,
    MAX_EXPIRES_SECONDS,
    Verifier,
    check_window,
    mismatch_details,
    parse_credential,
    parse_stamp,
    resolve,
    signing_key,
)
from broker.dev.emulators.oss_xml import xml_response
from broker.dev.emulators.sts import IssuedCredentials

__all__ = ["PostForm", "authenticate_post", "post_response", "read_form"]

_MAX_FIELD_BYTES: Final = 64 * 1024
_V1_EXEMPT: Final = frozenset({"file", "policy", "signature", "ossaccesskeyid"})
_V4_EXEMPT: Final = frozenset({"file", "policy", "x-oss-signature"})
_V4_REQUIRED: Final = ("x-oss-signature-version", "x-oss-credential", "x-oss-date")


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


async def read_form(request: web.Request, limit: int) -> tuple[PostForm, bytes]:
    """The form's fields (lower-case names) and file; ``file`` must come last."""
    if request.content_type != "multipart/form-data":
        raise OssError("MalformedPOSTRequest")
    fields: dict[str, str] = {}
    file: tuple[str, str | None, bytes] | None = None
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if file is not None or not isinstance(part, BodyPartReader):
                raise OssError(
                    "MalformedPOSTRequest", "The file form field must be the last field."
                )
            name = (part.name or "").lower()
            if name == "file":
                content = await _read_part(part, limit)
                file = (part.filename or "", part.headers.get("Content-Type"), content)
            elif name in fields or not name:
                raise OssError(
                    "MalformedPOSTRequest", f"Form field {name!r} is repeated or unnamed."
                )
            else:
                fields[name] = (await _read_part(part, _MAX_FIELD_BYTES)).decode("utf-8")
    except (ValueError, AssertionError, UnicodeDecodeError, HttpProcessingError):
        raise OssError("MalformedPOSTRequest") from None
    if file is None:
        raise invalid_argument("Bucket POST must contain a field named 'file'.")
    return PostForm(fields, file[0], file[1], len(file[2])), file[2]


async def _read_part(part: BodyPartReader, limit: int) -> bytes:
    chunks, size = [], 0
    while chunk := await part.read_chunk():
        size += len(chunk)
        if size > limit:
            raise OssError("EntityTooLarge")
        chunks.append(chunk)
    return b"".join(chunks)


def authenticate_post(
    form: PostForm, bucket: str, verifier: Verifier, *, strict_fields: bool
) -> IssuedCredentials:
    """Check a PostObject form's signature, then its policy; the caller's credentials."""
    fields = form.fields
    if "policy" not in fields:
        raise invalid_argument(
            "Bucket POST must contain a field named 'policy'.", ec="0002-00000702"
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
    if fields["x-oss-signature-version"] != ALGORITHM:
        raise invalid_argument("Unsupported x-oss-signature-version.")
    for name in ("x-oss-credential", "x-oss-date", "x-oss-signature"):
        if not fields.get(name):
            raise invalid_argument(f"Bucket POST must contain a field named '{name}'.")
    credential = parse_credential(fields["x-oss-credential"], verifier.region)
    check_window(parse_stamp(fields["x-oss-date"], credential), MAX_EXPIRES_SECONDS, verifier)
    issued = resolve(credential.access_key_id, fields.get("x-oss-security-token"), verifier)
    policy = fields["policy"]
    key = signing_key(issued.access_key_secret, credential)
    expected = hmac.new(key, policy.encode("utf-8"), hashlib.sha256).hexdigest()
    provided = fields["x-oss-signature"]
    if not hmac.compare_digest(expected, provided):
        details = mismatch_details(credential.access_key_id, provided, policy)
        raise OssError("SignatureDoesNotMatch", ec="0002-00000201", details=details)
    return issued


def _post_v1(fields: Mapping[str, str], verifier: Verifier) -> IssuedCredentials:
    access_key_id = fields.get("ossaccesskeyid", "")
    provided = fields.get("signature", "")
    if not access_key_id or not provided:
        raise invalid_argument("Bucket POST needs OSSAccessKeyId, policy and Signature.")
    issued = resolve(access_key_id, fields.get("x-oss-security-token"), verifier)
    policy = fields["policy"]
    digest = hmac.new(issued.access_key_secret.encode(), policy.encode("utf-8"), hashlib.sha1)
    expected = base64.b64encode(digest.digest()).decode()
    if not hmac.compare_digest(expected, provided):
        details = mismatch_details(access_key_id, provided, policy)
        raise OssError("SignatureDoesNotMatch", ec="0002-00000040", details=details)
    return issued


def _policy_conditions(encoded: str, now: float) -> list[Any]:
    """Decode the base64 JSON policy, check ``expiration``; its ``conditions``."""
    try:
        document = json.loads(base64.b64decode(encoded, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid_policy("Invalid JSON.") from None
    if not isinstance(document, dict):
        raise invalid_policy("Invalid JSON.")
    expiration, conditions = document.get("expiration"), document.get("conditions")
    if not isinstance(conditions, list):
        raise invalid_policy("Policy must contain conditions.")
    if now > _parse_expiration(expiration):
        raise OssError("AccessDenied", "Invalid according to Policy: Policy expired.")
    return conditions


def _parse_expiration(value: object) -> float:
    """ISO 8601 in GMT, ``2014-12-01T12:00:00.000Z``."""
    if not isinstance(value, str) or not value.endswith("Z"):
        raise invalid_policy(f"Invalid 'expiration' value: {value!r}.")
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise invalid_policy(f"Invalid 'expiration' value: {value!r}.") from None


def _require_v4_conditions(conditions: list[Any]) -> None:
    named = {_condition_field(condition) for condition in conditions}
    for name in _V4_REQUIRED:
        if name not in named:
            raise invalid_policy(f"{name} must be in the conditions.")


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
            raise invalid_policy(
                "Invalid Simple-Condition: Simple-Conditions must have exactly one property "
                "specified.",
            )
        ((name, expected),) = condition.items()
        condition = ["eq", f"${name}", expected]
    if not isinstance(condition, list) or len(condition) != 3:
        raise invalid_policy(f"Invalid Condition: {condition!r}.")
    operator, subject, operand = condition
    if operator == "content-length-range":
        _check_length(subject, operand, size)
        return "content-length"
    if not isinstance(subject, str) or not subject.startswith("$"):
        raise invalid_policy(f"Invalid Condition: {condition!r}.")
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
    raise invalid_policy(f"Invalid Condition operator {operator!r}.", ec="0006-00000224")


def _check_length(low: object, high: object, size: int) -> None:
    if isinstance(low, bool) or isinstance(high, bool):
        raise invalid_policy("content-length-range needs two integers.")
    if not isinstance(low, int) or not isinstance(high, int):
        raise invalid_policy("content-length-range needs two integers.")
    if size < low:
        raise OssError("EntityTooSmall")
    if size > high:
        raise OssError("EntityTooLarge")


def post_response(status: str | None, bucket: str, key: str, etag: str) -> web.Response:
    """``success_action_status``: 200 and 201 (with PostResponse XML); anything else 204."""
    headers = {"ETag": etag}
    if status == "200":
        return web.Response(status=200, headers=headers)
    if status == "201":
        nodes = [("Bucket", bucket), ("Location", f"/{bucket}/{quote(key)}"), ("Key", key)]
        return xml_response("PostResponse", [*nodes, ("ETag", etag)], 201, headers)
    return web.Response(status=204, headers=headers)
