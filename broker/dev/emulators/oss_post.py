"""PostObject in the OSS emulator: read the form, check its signature and policy, answer.

From OSS's "PostObject", "POST V4 signature" and "POST V1 signature" pages: V4
signs the base64 policy with the V4 signing key (hex), V1 with HMAC-SHA1 of
the secret (base64); the policy's ``expiration`` and every condition
(``eq``, ``starts-with``, ``in``, ``not-in``, ``content-length-range``) are
enforced; ``file`` must be the form's last field.

Form fields the policy does not name are accepted, as OSS accepts them: the
valid request on https://help.aliyun.com/en/oss/user-guide/0006-00000201
carries ``success_action_status``, ``Content-Disposition`` and ``x-oss-meta-*``
fields its policy's conditions never mention (so does the one on
https://help.aliyun.com/en/oss/user-guide/0006-00000117).  A field that a
condition NAMES must be present: https://help.aliyun.com/en/oss/user-guide/0006-00000226.
The fields OSS understands are applied (``post_headers``, ``post_response``):
Content-Type and the other stored headers, ``x-oss-meta-*``,
``x-oss-object-acl``, ``x-oss-forbid-overwrite``, ``success_action_status``,
``success_action_redirect`` and ``callback`` (``parse_callback``).
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
from urllib.parse import quote, urlencode

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
from broker.dev.emulators.oss_store import DEFAULT_TYPE
from broker.dev.emulators.oss_xml import xml_response
from broker.dev.emulators.sts import IssuedCredentials

__all__ = [
    "PostForm",
    "authenticate_post",
    "parse_callback",
    "post_headers",
    "post_response",
    "read_form",
]

_MAX_FIELD_BYTES: Final = 64 * 1024
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


def authenticate_post(form: PostForm, bucket: str, verifier: Verifier) -> IssuedCredentials:
    """Check a PostObject form's signature, then its policy; the caller's credentials."""
    fields = form.fields
    if "policy" not in fields:
        raise invalid_argument(
            "Bucket POST must contain a field named 'policy'.", ec="0002-00000702"
        )
    if "x-oss-signature-version" in fields:
        issued = _post_v4(fields, verifier)
    elif "ossaccesskeyid" in fields or "signature" in fields:
        issued = _post_v1(fields, verifier)
    else:
        raise OssError("AccessDenied")
    conditions = _policy_conditions(fields["policy"], verifier.clock())
    if "x-oss-signature-version" in fields:
        _require_v4_conditions(conditions)
    values = {**fields, "bucket": bucket}
    if form.content_type:
        values["content-type"] = form.content_type
    for condition in conditions:
        _check_condition(condition, values, form.size)
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
        raise OssError("SignatureDoesNotMatch", ec="0002-00000705", details=details)
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


def _check_condition(condition: object, values: Mapping[str, str], size: int) -> None:
    """Enforce one condition; the form field it names must be present."""
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
        return
    if not isinstance(subject, str):
        raise invalid_policy(f"Invalid Condition: {condition!r}.")
    # "$name" as documented; OSS's own EC page 0006-00000226 also writes the bare name.
    name = subject.removeprefix("$").lower()
    value = values.get(name)
    if value is None or not _condition_holds(operator, value, operand):
        failed = json.dumps(condition)
        ec = "0006-00000226" if value is None else ""
        message = f"Invalid according to Policy: Policy Condition failed: {failed}"
        raise OssError("AccessDenied", message, ec=ec)


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


def post_headers(form: PostForm) -> dict[str, str]:
    """What OSS stores from the form: Content-Type (else the file part's), headers, meta, ACL."""
    return {**form.fields, "content-type": form.content_type or DEFAULT_TYPE}


def parse_callback(fields: Mapping[str, str]) -> dict[str, Any] | None:
    """Check the fields applied after the upload; the ``callback`` field's JSON, or None.

    ``success_action_redirect`` must be an http(s) URL; ``callback`` base64 JSON
    with ``callbackUrl`` and ``callbackBody``.  Checked before anything is stored.

    An EMPTY field is taken as absent.  OSS documents neither case; S3, whose
    POST form OSS follows, "acts as if the field is not present" when it cannot
    interpret the redirect URL
    (https://docs.aws.amazon.com/AmazonS3/latest/API/RESTObjectPOST.html).  The
    broker pins both fields to "" in a form that may carry none
    (``broker.post_forms.pinned_post_fields``): this is the assumption it rests on
    (were OSS to refuse an empty field, such uploads would fail, not gain a callback).
    """
    redirect = fields.get("success_action_redirect")
    if redirect and not _http_url(redirect):
        raise invalid_argument("success_action_redirect must be an http(s) URL.")
    raw = fields.get("callback")
    if not raw:
        return None
    try:
        parsed = json.loads(base64.b64decode(raw, validate=True).decode("utf-8"))
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid_argument("The callback configuration is not base64-encoded JSON.") from None
    if not isinstance(parsed, dict) or not parsed.get("callbackUrl"):
        raise invalid_argument("The callback configuration needs callbackUrl and callbackBody.")
    if "callbackBody" not in parsed:
        raise invalid_argument("The callback configuration needs callbackUrl and callbackBody.")
    return parsed


def post_response(fields: Mapping[str, str], bucket: str, key: str, etag: str) -> web.Response:
    """``success_action_redirect`` (303), else ``success_action_status``: 200, 201 or 204.

    201 carries the PostResponse XML; any other or no status answers 204.
    """
    headers = {"ETag": etag}
    redirect = fields.get("success_action_redirect")
    if redirect:
        query = urlencode({"bucket": bucket, "key": key, "etag": etag})
        separator = "&" if "?" in redirect else "?"
        headers["Location"] = f"{redirect}{separator}{query}"
        return web.Response(status=303, headers=headers)
    status = fields.get("success_action_status")
    if status == "200":
        return web.Response(status=200, headers=headers)
    if status == "201":
        nodes = [("Bucket", bucket), ("Location", f"/{bucket}/{quote(key)}"), ("Key", key)]
        return xml_response("PostResponse", [*nodes, ("ETag", etag)], 201, headers)
    return web.Response(status=204, headers=headers)


def _http_url(text: str) -> bool:
    printable = text.isascii() and text.isprintable() and " " not in text
    return printable and text.startswith(("http://", "https://"))
