"""PostObject at the OSS emulator: V1 and V4 forms, the policy, and the fields OSS applies."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from datetime import UTC, datetime
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from multidict import CIMultiDict

from tests.conftest import FakeClock
from tests.dev.emulators.conftest import BUCKET, REGION, Harness, error_xml, raw


def stamp_of(clock: FakeClock) -> str:
    return datetime.fromtimestamp(clock.now, UTC).strftime("%Y%m%dT%H%M%SZ")


def encode_policy(clock: FakeClock, conditions: list[Any], lifetime_seconds: int = 600) -> str:
    expiration = datetime.fromtimestamp(clock.now + lifetime_seconds, UTC)
    document = {
        "expiration": expiration.strftime("%Y-%m-%dT%H:%M:%S.000Z"),
        "conditions": conditions,
    }
    return base64.b64encode(json.dumps(document).encode()).decode()


BASE_CONDITIONS: list[Any] = [
    ["starts-with", "$key", "user/alice/"],
    ["content-length-range", 1, 1024],
    ["eq", "$content-type", "text/plain"],
    ["eq", "$success_action_status", "201"],
]


def post_v4_fields(
    h: Harness, conditions: list[Any] = BASE_CONDITIONS, *, include_required: bool = True
) -> dict[str, str]:
    """A V4 PostObject form, built from the "POST V4 signature" document's algorithm."""
    stamp = stamp_of(h.clock)
    credential = f"{h.creds.access_key_id}/{stamp[:8]}/{REGION}/oss/aliyun_v4_request"
    required = [
        {"bucket": BUCKET},
        {"x-oss-signature-version": "OSS4-HMAC-SHA256"},
        {"x-oss-credential": credential},
        {"x-oss-date": stamp},
        {"x-oss-security-token": h.creds.security_token},
    ]
    encoded = encode_policy(h.clock, (required if include_required else []) + conditions)
    key = ("aliyun_v4" + h.creds.access_key_secret).encode()
    for part in (stamp[:8], REGION, "oss", "aliyun_v4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return {
        "key": "user/alice/form.txt",
        "Content-Type": "text/plain",
        "success_action_status": "201",
        "policy": encoded,
        "x-oss-signature-version": "OSS4-HMAC-SHA256",
        "x-oss-credential": credential,
        "x-oss-date": stamp,
        "x-oss-security-token": h.creds.security_token,
        "x-oss-signature": hmac.new(key, encoded.encode(), hashlib.sha256).hexdigest(),
    }


def post_v1_fields(h: Harness, conditions: list[Any] = BASE_CONDITIONS) -> dict[str, str]:
    """A V1 PostObject form: Signature = base64(HMAC-SHA1(secret, base64 policy))."""
    encoded = encode_policy(h.clock, [{"bucket": BUCKET}, *conditions])
    digest = hmac.new(h.creds.access_key_secret.encode(), encoded.encode(), hashlib.sha1).digest()
    return {
        "key": "user/alice/form-v1.txt",
        "Content-Type": "text/plain",
        "success_action_status": "201",
        "OSSAccessKeyId": h.creds.access_key_id,
        "policy": encoded,
        "Signature": base64.b64encode(digest).decode(),
        "x-oss-security-token": h.creds.security_token,
    }


async def post_form(
    h: Harness,
    fields: dict[str, str],
    content: bytes = b"form body",
    *,
    file_last: bool = True,
    allow_redirects: bool = True,
) -> tuple[int, CIMultiDict[str], bytes]:
    """POST ``fields`` and a file part (last unless ``file_last`` is False) to the bucket."""
    form = aiohttp.FormData()
    if not file_last:
        form.add_field("file", content, filename="a.txt", content_type="text/plain")
    for name, value in fields.items():
        form.add_field(name, value)
    if file_last:
        form.add_field("file", content, filename="a.txt", content_type="text/plain")
    url = f"{h.url}/{BUCKET}/"
    return await raw("POST", url, data=form, allow_redirects=allow_redirects)


async def test_post_object_v4_form_is_accepted(harness: Harness) -> None:
    """A V4-signed PostObject form within its policy stores the file; 201 with PostResponse."""
    status, headers, body = await post_form(harness, post_v4_fields(harness))
    assert status == 201, body
    root = ElementTree.fromstring(body)  # noqa: S314 - the emulator's own reply
    assert (root.tag, root.findtext("Key")) == ("PostResponse", "user/alice/form.txt")
    assert root.findtext("ETag") == headers["ETag"]
    assert harness.emulator.read_object(BUCKET, "user/alice/form.txt") == b"form body"


async def test_post_object_v1_form_is_accepted(harness: Harness) -> None:
    """A V1-signed (OSSAccessKeyId, Signature) PostObject form within its policy is stored."""
    conditions = [c for c in BASE_CONDITIONS if "$success_action_status" not in c]
    fields = post_v1_fields(harness, [*conditions, ["eq", "$success_action_status", "204"]])
    fields["success_action_status"] = "204"
    status, _, body = await post_form(harness, fields)
    assert status == 204, body
    assert harness.emulator.read_object(BUCKET, "user/alice/form-v1.txt") == b"form body"


@pytest.mark.parametrize(
    ("mutate", "content", "status", "code", "message_part"),
    [
        (
            lambda f: f | {"key": "user/bob/form.txt"},
            b"x",
            403,
            "AccessDenied",
            '["starts-with", "$key", "user/alice/"]',
        ),
        (lambda f: f, b"x" * 1025, 400, "EntityTooLarge", ""),
        (lambda f: f, b"", 400, "EntityTooSmall", ""),
        (lambda f: f | {"Content-Type": "text/html"}, b"x", 403, "AccessDenied", '"$content-type"'),
        (
            lambda f: f | {"success_action_status": "200"},
            b"x",
            403,
            "AccessDenied",
            "success_action_status",
        ),
        (lambda f: f | {"x-oss-signature": "0" * 64}, b"x", 403, "SignatureDoesNotMatch", ""),
        (
            lambda f: {k: v for k, v in f.items() if k != "key"},
            b"x",
            400,
            "InvalidArgument",
            "'key'",
        ),
        (
            lambda f: {k: v for k, v in f.items() if k != "x-oss-security-token"},
            b"x",
            403,
            "InvalidAccessKeyId",
            "",
        ),
    ],
    ids=[
        "key-prefix",
        "too-large",
        "too-small",
        "content-type",
        "status",
        "signature",
        "no-key",
        "no-token",
    ],
)
async def test_post_object_v4_violations_are_rejected(
    harness: Harness, mutate: Any, content: bytes, status: int, code: str, message_part: str
) -> None:
    """Each violated PostObject V4 condition or signature rule is refused; nothing is stored."""
    got_status, _, body = await post_form(harness, mutate(post_v4_fields(harness)), content)
    fields = error_xml(body)
    assert (got_status, fields["Code"]) == (status, code), fields
    assert message_part in fields["Message"]
    assert not list(harness.storage_dir.rglob("*.txt"))


async def test_post_object_expired_policy_is_rejected(harness: Harness) -> None:
    """A PostObject policy past its expiration gets 403 "...Policy: Policy expired."."""
    fields = post_v4_fields(harness)
    harness.clock.advance(601)
    status, _, body = await post_form(harness, fields)
    assert (status, error_xml(body)["Message"]) == (
        403,
        "Invalid according to Policy: Policy expired.",
    )


async def test_post_object_file_must_be_last(harness: Harness) -> None:
    """A form field after the file part is refused as a malformed POST."""
    status, _, body = await post_form(harness, post_v4_fields(harness), file_last=False)
    assert (status, error_xml(body)["Code"]) == (400, "MalformedPOSTRequest")


@pytest.mark.parametrize(
    ("changes", "content", "code"),
    [
        ({"key": "elsewhere/form.txt"}, b"x", "AccessDenied"),
        ({"Content-Type": "image/png"}, b"x", "AccessDenied"),
        ({}, b"x" * 2048, "EntityTooLarge"),
        ({"Signature": base64.b64encode(b"x" * 20).decode()}, b"x", "SignatureDoesNotMatch"),
    ],
    ids=["key-prefix", "content-type", "too-large", "signature"],
)
async def test_post_object_v1_violations_are_rejected(
    harness: Harness, changes: dict[str, str], content: bytes, code: str
) -> None:
    """The V1 form's signature and policy conditions are enforced like V4's."""
    status, _, body = await post_form(harness, post_v1_fields(harness) | changes, content)
    assert (status // 100, error_xml(body)["Code"]) == (4, code)
    assert not list(harness.storage_dir.rglob("*.txt"))


async def test_post_object_v4_policy_must_name_the_signature_fields(harness: Harness) -> None:
    """A V4 policy without x-oss-signature-version/credential/date conditions is refused."""
    fields = post_v4_fields(harness, include_required=False)
    status, _, body = await post_form(harness, fields)
    assert (status, error_xml(body)["Code"]) == (400, "InvalidPolicyDocument")


async def test_post_object_inside_form_policy_but_outside_sts_policy_is_denied(
    harness: Harness,
) -> None:
    """A key the form policy allows but the token's RAM policy does not gets AccessDenied."""
    conditions = [["starts-with", "$key", "user/"], *BASE_CONDITIONS[1:]]
    fields = post_v4_fields(harness, conditions) | {"key": "user/bob/form.txt"}
    status, _, body = await post_form(harness, fields)
    fields_xml = error_xml(body)
    assert (status, fields_xml["Message"]) == (403, "Access denied by authorizer's policy.")


async def test_fields_the_policy_does_not_name_are_accepted_and_applied(harness: Harness) -> None:
    """As in OSS's own 0006-00000201 example: unnamed fields pass, and OSS applies them."""
    fields = post_v4_fields(harness) | {
        "Content-Disposition": 'attachment; filename="a.txt"',
        "Cache-Control": "no-cache",
        "x-oss-meta-owner": "alice",
        "x-oss-object-acl": "private",
    }
    status, _, body = await post_form(harness, fields)
    assert status == 201, body
    stored = harness.emulator.object_attributes(BUCKET, "user/alice/form.txt")
    assert stored is not None
    assert stored.content_type == "text/plain"
    assert dict(stored.headers) == {
        "Content-Disposition": 'attachment; filename="a.txt"',
        "Cache-Control": "no-cache",
    }
    assert (dict(stored.metadata), stored.acl) == ({"x-oss-meta-owner": "alice"}, "private")


@pytest.mark.parametrize("v1", [False, True], ids=["v4", "v1"])
async def test_a_field_named_by_a_condition_must_be_present(harness: Harness, v1: bool) -> None:
    """A field a condition names but the form lacks: 403, EC 0006-00000226; nothing stored."""
    fields = post_v1_fields(harness) if v1 else post_v4_fields(harness)
    del fields["success_action_status"]
    status, _, body = await post_form(harness, fields)
    error = error_xml(body)
    assert (status, error["Code"], error["EC"]) == (403, "AccessDenied", "0006-00000226")
    assert "$success_action_status" in error["Message"]
    assert not list(harness.storage_dir.rglob("*.txt"))


async def test_a_condition_may_name_a_field_without_the_dollar(harness: Harness) -> None:
    """["eq", "success_action_status", "201"], as OSS's EC page writes it, binds the field."""
    conditions = [*BASE_CONDITIONS[:3], ["eq", "success_action_status", "201"]]
    ok_status, _, _ = await post_form(harness, post_v4_fields(harness, conditions))
    fields = post_v4_fields(harness, conditions) | {"success_action_status": "200"}
    bad_status, _, body = await post_form(harness, fields)
    assert (ok_status, bad_status, error_xml(body)["Code"]) == (201, 403, "AccessDenied")


async def test_forbid_overwrite_field_refuses_a_second_upload(harness: Harness) -> None:
    """x-oss-forbid-overwrite=true in the form: the second upload to a key is 409; first kept."""
    fields = post_v4_fields(harness) | {"x-oss-forbid-overwrite": "true"}
    first, _, _ = await post_form(harness, fields, b"first")
    second, _, body = await post_form(harness, fields, b"second")
    assert (first, second, error_xml(body)["Code"]) == (201, 409, "FileAlreadyExists")
    assert harness.emulator.read_object(BUCKET, "user/alice/form.txt") == b"first"


@pytest.mark.parametrize(
    ("field", "value", "ec"),
    [
        ("x-oss-forbid-overwrite", "abc", "0006-00000117"),
        ("x-oss-object-acl", "everyone", ""),
        ("success_action_redirect", "javascript:alert(1)", ""),
        ("callback", "not base64 json", ""),
    ],
    ids=["forbid-overwrite", "acl", "redirect", "callback"],
)
async def test_invalid_applied_fields_are_invalid_argument(
    harness: Harness, field: str, value: str, ec: str
) -> None:
    """A field OSS understands with a value it refuses: 400 InvalidArgument; nothing stored."""
    status, _, body = await post_form(harness, post_v4_fields(harness) | {field: value})
    error = error_xml(body)
    assert (status, error["Code"], error.get("EC", "")) == (400, "InvalidArgument", ec)
    assert harness.emulator.read_object(BUCKET, "user/alice/form.txt") is None


async def test_empty_callback_and_redirect_fields_are_taken_as_absent(harness: Harness) -> None:
    """callback="" and success_action_redirect="" (how the broker pins "none"): a plain upload."""
    fields = post_v4_fields(harness) | {"callback": "", "success_action_redirect": ""}
    status, _, _ = await post_form(harness, fields, b"plain")
    assert status == 201
    assert harness.emulator.callbacks == []
    assert harness.emulator.read_object(BUCKET, "user/alice/form.txt") == b"plain"


async def test_success_action_redirect_answers_303_with_the_object(harness: Harness) -> None:
    """success_action_redirect: 303 to the URL with bucket, key and etag; the file is stored."""
    fields = post_v4_fields(harness) | {"success_action_redirect": "https://app.example/done?x=1"}
    status, headers, _ = await post_form(harness, fields, allow_redirects=False)
    assert status == 303
    location = headers["Location"]
    assert location.startswith("https://app.example/done?x=1&bucket=examplebucket&key=user")
    assert "etag=" in location
    assert harness.emulator.read_object(BUCKET, "user/alice/form.txt") == b"form body"


async def test_callback_is_recorded_never_called(harness: Harness) -> None:
    """A callback field: object stored, callback recorded, 203 CallbackFailed (never called)."""
    callback = {"callbackUrl": "http://192.0.2.1/cb", "callbackBody": "bucket=${bucket}"}
    encoded = base64.b64encode(json.dumps(callback).encode()).decode()
    status, _, body = await post_form(harness, post_v4_fields(harness) | {"callback": encoded})
    assert (status, error_xml(body)["Code"]) == (203, "CallbackFailed")
    assert harness.emulator.read_object(BUCKET, "user/alice/form.txt") == b"form body"
    recorded = harness.emulator.callbacks[-1]
    assert (recorded.key, dict(recorded.callback)) == ("user/alice/form.txt", callback)


async def test_v1_form_signature_mismatch_has_the_post_ec(harness: Harness) -> None:
    """A wrong V1 form Signature: 403 SignatureDoesNotMatch with EC 0002-00000705."""
    fields = post_v1_fields(harness) | {"Signature": base64.b64encode(b"y" * 20).decode()}
    status, _, body = await post_form(harness, fields)
    error = error_xml(body)
    assert (status, error["Code"], error["EC"]) == (403, "SignatureDoesNotMatch", "0002-00000705")
