"""What a caller may sign (broker.uploads): body fields, object keys, headers, expiry clamping.

The body rules are driven through the real server (the handlers parse bodies
into these models); ``check_key`` and ``clamp_expiry`` are also pinned as
Hypothesis properties of the pure functions.
"""

from __future__ import annotations

import base64
import functools
import json
import math
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
import pytest
from aiohttp.test_utils import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.auth import hash_api_key
from broker.dev.stack import DevStack, dev_stack
from broker.errors import AccessDenied, RequestInvalid
from broker.names import is_caller_id
from broker.policies import Policy, PolicySet, load_policies
from broker.post_forms import PostForm, post_policy_conditions
from broker.signing import MAX_EXPIRES_SECONDS
from broker.uploads import (
    MAX_KEY_BYTES,
    PostPolicyBody,
    check_key,
    check_part_size,
    clamp_expiry,
    key_under,
    valid_key,
)
from tests.conftest import POLICIES_DIR, BrokerHarness, FakeClock, start_test_server
from tests.wire import POST_POLICY, PRESIGN, error_code, post_json

_BOUNDED = settings(max_examples=200, deadline=None, database=None)

# --- body fields: types, unknown fields, ranges ---


WRONG_TYPES = [
    ("expires_seconds", "600"),
    ("expires_seconds", 600.0),
    ("expires_seconds", 1.5),
    ("expires_seconds", True),
    ("expires_seconds", [600]),
    ("expires_seconds", {"seconds": 600}),
    ("policy", 1),
    ("policy", ["avatar-upload"]),
    ("policy", {"name": "avatar-upload"}),
    ("policy", None),
    ("key", 12),
    ("key", ["avatars/alice/me.png"]),
    ("key", False),
    ("content_type", ["image/png"]),
    ("content_type", 1),
    ("metadata", ["a", "b"]),
    ("metadata", {"a": 1}),
    ("metadata", {"a": {"b": "c"}}),
    ("metadata", "a=b"),
    ("headers", {"x-oss-forbid-overwrite": True}),
    ("part_number", "1"),
    ("callback", "https://cb.example/"),
]


@pytest.mark.parametrize(("field", "value"), WRONG_TYPES)
async def test_wrong_types_in_presign_are_400(
    broker: BrokerHarness, field: str, value: Any
) -> None:
    """Strings for ints, floats, booleans, arrays and objects where scalars belong: 400."""
    status, reply = await post_json(broker, "/v1/presign", {**PRESIGN, field: value})
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_object_bytes", "1024"),
        ("max_object_bytes", 1024.5),
        ("max_object_bytes", True),
        ("success_action_status", "201"),
        ("success_action_status", 202),
        ("signature_version", "v2"),
        ("key_prefix", ["avatars/alice/"]),
        ("expires_seconds", {"$gt": 0}),
    ],
)
async def test_wrong_types_in_post_policy_are_400(
    broker: BrokerHarness, field: str, value: Any
) -> None:
    """The post-policy body is as strict: wrong types and values outside enums are 400."""
    status, reply = await post_json(broker, "/v1/post-policy", {**POST_POLICY, field: value})
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/presign", {**PRESIGN, "acl": "public-read"}),
        ("/v1/presign", {**PRESIGN, "Policy": "avatar-upload"}),
        ("/v1/presign", {**PRESIGN, "callback": {"url": "u", "body": "b", "host": "evil"}}),
        ("/v1/post-policy", {**POST_POLICY, "Bucket": "otherbucket"}),
        ("/v1/post-policy", {**POST_POLICY, "conditions": [["starts-with", "$key", ""]]}),
    ],
)
async def test_unknown_fields_are_400(broker: BrokerHarness, path: str, body: Any) -> None:
    """Fields the models do not declare, at any depth, are refused, not ignored."""
    status, reply = await post_json(broker, path, body)
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


async def test_policy_name_with_trailing_newline_in_a_body_is_400(broker: BrokerHarness) -> None:
    """In a body, "avatar-upload\\n" fails the pattern: 400 RequestInvalid."""
    status, reply = await post_json(broker, "/v1/presign", {**PRESIGN, "policy": "avatar-upload\n"})
    assert (status, error_code(reply)) == (400, "RequestInvalid")


@pytest.mark.parametrize("value", [0, -1, 604801, 10**100, 1e100, "600", True, False, 600.0, [600]])
@pytest.mark.parametrize(
    ("path", "base"), [("/v1/presign", PRESIGN), ("/v1/post-policy", POST_POLICY)]
)
async def test_out_of_range_expiry_is_400(
    broker: BrokerHarness, path: str, base: dict[str, Any], value: Any
) -> None:
    """expires_seconds outside 1..604800, or not a JSON integer, is 400 before STS."""
    status, reply = await post_json(broker, path, {**base, "expires_seconds": value})
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    ("path", "base"), [("/v1/presign", PRESIGN), ("/v1/post-policy", POST_POLICY)]
)
async def test_null_expiry_means_the_policy_cap(
    broker: BrokerHarness, path: str, base: dict[str, Any]
) -> None:
    """expires_seconds: null is the same as leaving it out: the policy's cap, not clamped."""
    status, reply = await post_json(broker, path, {**base, "expires_seconds": None})
    assert status == 200, reply
    assert (reply["expires_in"], reply["clamped"]) == (600, False)


# --- keys, metadata and headers ---


@pytest.mark.parametrize(
    "key",
    [
        "\uff41vatars/alice/me.png",  # fullwidth a: NFKC folds it to "a"
        "avatars\u2215alice/me.png",  # division slash
        "avatars/alice\uff0fme.png",  # fullwidth solidus
        "avatars/ali\u0301ce/me.png",  # a combining accent inside the subject
        "avatars/alice\u200d/me.png",  # zero-width joiner after the subject
        "\u202eavatars/alice/me.png",  # right-to-left override before the prefix
        "avatars/Alice/me.png",
    ],
)
async def test_lookalikes_of_the_prefix_are_outside_it(broker: BrokerHarness, key: str) -> None:
    """Keys that only look like, or normalize to, the caller's prefix are 403: no folding."""
    status, reply = await post_json(broker, "/v1/presign", {**PRESIGN, "key": key})
    assert (status, error_code(reply)) == (403, "AccessDenied")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "name",
    [
        "\u00e9.png",  # NFC
        "e\u0301.png",  # NFD of the same
        "a\u200db.png",  # zero-width joiner
        "\u202egnp.exe",  # right-to-left override
        "\u2028.png",  # line separator
    ],
)
async def test_unicode_under_the_prefix_is_signed_verbatim(
    broker: BrokerHarness, name: str
) -> None:
    """Format characters under the prefix are signed byte for byte as sent, never normalized."""
    status, reply = await post_json(
        broker, "/v1/presign", {**PRESIGN, "key": "avatars/alice/" + name}
    )
    assert status == 200, reply
    assert unquote(urlsplit(reply["url"]).path) == "/avatars/alice/" + name


@pytest.mark.parametrize(
    "metadata",
    [{"note": "\u202eevil"}, {"note": "caf\u00e9"}, {"n\u00f6te": "x"}, {"note": "a\u200db"}],
)
async def test_non_ascii_metadata_is_400(broker: BrokerHarness, metadata: dict[str, str]) -> None:
    """Metadata names and values are ASCII: RTL overrides, accents and joiners are refused."""
    status, reply = await post_json(broker, "/v1/presign", {**PRESIGN, "metadata": metadata})
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


@pytest.mark.parametrize(
    "changes",
    [
        {"content_type": "image/png\r\nX-Evil: 1"},
        {"content_type": "image/png\nX-Evil: 1"},
        {"metadata": {"note": "a\r\nx-oss-object-acl: public-read"}},
        {"metadata": {"note\r\nx-oss-object-acl": "public-read"}},
        {"headers": {"x-oss-forbid-overwrite": "true\r\nx-oss-object-acl: public-read"}},
        {"headers": {"x-oss-forbid-overwrite\r\nx-oss-object-acl": "true"}},
        {"key": "avatars/alice/a\r\nb.png"},
        {"upload_id": "a\r\nb", "operation": "abort_multipart"},
    ],
)
async def test_crlf_in_values_is_400(broker: BrokerHarness, changes: dict[str, Any]) -> None:
    """CR/LF in anything that would become a signed header or URL is refused, never signed."""
    status, reply = await post_json(broker, "/v1/presign", {**PRESIGN, **changes})
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert "url" not in reply
    assert broker.sts.emulator.calls == []


async def test_crlf_in_post_policy_content_type_is_400(broker: BrokerHarness) -> None:
    """The post-policy content_type is held to the same pattern."""
    body = {**POST_POLICY, "content_type": "image/png\r\nX-Evil: 1"}
    status, reply = await post_json(broker, "/v1/post-policy", body)
    assert (status, error_code(reply)) == (400, "RequestInvalid")


# --- properties of check_key and clamp_expiry ---

_SAFE_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._@-"
_subjects = st.text(_SAFE_CHARS, min_size=1, max_size=64).filter(is_caller_id)
_prefixes = st.one_of(
    st.builds(lambda subject: f"avatars/{subject}/", _subjects),
    st.sampled_from(["reports/", "services/svc-a/", "a/b/c/"]),
)
_any_text = st.text(st.characters(exclude_categories=()), max_size=80)
_bad_parts = st.sampled_from(["..", ".", "\\", "\x00", "\r", "\n", "\x7f", "\x85", "\x1b"])


def _keys_near(prefix: str) -> st.SearchStrategy[str]:
    return st.one_of(
        _any_text,
        st.builds(lambda rest: prefix + rest, _any_text),
        st.builds(lambda rest: prefix[:-1] + rest, _any_text),
        st.builds(lambda rest: "/" + prefix + rest, _any_text),
        st.builds(lambda rest: prefix + "../" + rest, _any_text),
    )


@_BOUNDED
@given(data=st.data(), prefix=_prefixes)
def test_check_key_never_accepts_a_key_outside_the_prefix(data: st.DataObject, prefix: str) -> None:
    """check_key returns only well-formed keys strictly under the prefix; else 400 or 403."""
    key = data.draw(_keys_near(prefix))
    try:
        accepted = check_key(key, prefix)
    except (RequestInvalid, AccessDenied):
        return
    assert accepted == key
    assert key.startswith(prefix)
    assert key != prefix
    assert not key.startswith("/")
    assert "\\" not in key
    assert not any(segment in (".", "..") for segment in key.split("/"))
    assert not any(ord(char) < 0x20 or 0x7F <= ord(char) <= 0x9F for char in key)
    assert 1 <= len(key.encode("utf-8")) <= MAX_KEY_BYTES


@_BOUNDED
@given(data=st.data(), prefix=_prefixes)
def test_key_under_after_valid_key_decides_as_check_key(data: st.DataObject, prefix: str) -> None:
    """valid_key then key_under (the presign path) accepts and refuses exactly as check_key."""
    key = data.draw(_keys_near(prefix))
    try:
        expected: object = check_key(key, prefix)
    except (RequestInvalid, AccessDenied) as err:
        expected = (type(err), err.message)
    try:
        got: object = key_under(valid_key(key), prefix)
    except (RequestInvalid, AccessDenied) as err:
        got = (type(err), err.message)
    assert got == expected


@_BOUNDED
@given(prefix=_prefixes, before=_any_text, bad=_bad_parts, after=_any_text)
def test_check_key_refuses_traversal_and_controls_even_under_the_prefix(
    prefix: str, before: str, bad: str, after: str
) -> None:
    """A key with a ./.. segment, a backslash or a control character is always refused."""
    key = prefix + before.replace("/", "") + "/" + bad + "/" + after
    with pytest.raises((RequestInvalid, AccessDenied)):
        check_key(key, prefix)
    with pytest.raises((RequestInvalid, AccessDenied)):
        check_key("/" + prefix + "x", prefix)


_sane_segment = st.text(
    st.characters(
        categories=["L", "N", "Pd", "Pc"], include_characters="~!()' ", exclude_characters="/\\"
    ),
    min_size=1,
    max_size=30,
).filter(lambda segment: segment not in (".", ".."))


@_BOUNDED
@given(prefix=_prefixes, segments=st.lists(_sane_segment, min_size=1, max_size=6))
def test_check_key_accepts_every_sane_key_under_the_prefix(
    prefix: str, segments: list[str]
) -> None:
    """Printable, traversal-free keys of at most 1023 bytes under the prefix are accepted as is."""
    key = prefix + "/".join(segments)
    if len(key.encode("utf-8")) > MAX_KEY_BYTES:
        return
    assert check_key(key, prefix) == key


@functools.cache
def _avatar_policy() -> Policy:
    policy = load_policies(POLICIES_DIR).get("avatar-upload")
    assert policy is not None
    return policy


def _policy(cap: int) -> Policy:
    return _avatar_policy().model_copy(update={"max_url_expires_seconds": cap})


@_BOUNDED
@given(
    requested=st.none() | st.integers(1, MAX_EXPIRES_SECONDS),
    cap=st.integers(1, MAX_EXPIRES_SECONDS),
    remaining=st.floats(-1e3, 2e6, allow_nan=False),
)
def test_clamp_expiry_never_outlives_request_cap_week_or_token(
    requested: int | None, cap: int, remaining: float
) -> None:
    """The lifetime is min(requested, cap, 7 days, floor(token left)); clamped iff shorter."""
    policy = _policy(cap)
    if math.floor(remaining) < 1:
        with pytest.raises(RequestInvalid):
            clamp_expiry(requested, policy, remaining)
        return
    expiry = clamp_expiry(requested, policy, remaining)
    asked = requested if requested is not None else cap
    assert 1 <= expiry.seconds <= min(cap, MAX_EXPIRES_SECONDS, math.floor(remaining))
    assert expiry.seconds <= asked
    assert expiry.seconds == min(asked, cap, math.floor(remaining))
    assert expiry.requested_seconds == min(asked, MAX_EXPIRES_SECONDS)
    assert expiry.clamped == (expiry.seconds < asked)


# --- post policies pin every security-relevant field ---

_CALLBACK_URL = "https://cb.example.com/uploaded"
_PINNED = {"x-oss-object-acl", "x-oss-forbid-overwrite", "success_action_redirect", "callback"}


def _with_callback_urls(policy: Policy) -> Policy:
    return policy.model_copy(update={"callback_urls": (_CALLBACK_URL,)})


def _form(**body: Any) -> PostForm:
    policy = _with_callback_urls(_avatar_policy())
    return post_policy_conditions(
        PostPolicyBody.model_validate({**POST_POLICY, **body}), policy, "avatars/alice/"
    )


def test_post_policy_pins_acl_overwrite_redirect_and_callback() -> None:
    """Without asking: ACL "default", overwrite "false", no redirect and no callback, each eq."""
    form = _form()
    assert ["eq", "$x-oss-object-acl", "default"] in form.conditions
    assert ["eq", "$x-oss-forbid-overwrite", "false"] in form.conditions
    assert ["eq", "$success_action_redirect", ""] in form.conditions
    assert ["eq", "$callback", ""] in form.conditions
    assert {name: form.fields[name] for name in _PINNED} == {
        "x-oss-object-acl": "default",
        "x-oss-forbid-overwrite": "false",
        "success_action_redirect": "",
        "callback": "",
    }


def test_post_policy_signs_an_allowed_callback_and_forbid_overwrite() -> None:
    """An allowlisted callback is the only callback the form takes; forbid_overwrite pins "true"."""
    callback = {"url": _CALLBACK_URL, "body": "key=${object}"}
    form = _form(callback=callback, forbid_overwrite=True)
    encoded = form.fields["callback"]
    assert json.loads(base64.b64decode(encoded)) == {
        "callbackUrl": _CALLBACK_URL,
        "callbackBody": "key=${object}",
        "callbackBodyType": "application/x-www-form-urlencoded",
    }
    assert ["eq", "$callback", encoded] in form.conditions
    assert ["eq", "$x-oss-forbid-overwrite", "true"] in form.conditions


def test_post_policy_refuses_a_callback_outside_the_allowlist() -> None:
    """A callback URL the policy does not list is 403, as for presign."""
    with pytest.raises(AccessDenied, match="callback_urls"):
        _form(callback={"url": "https://evil.example.com/", "body": "x"})


@dataclass
class _Oss:
    """The OSS and STS emulators as real servers, and a broker on a socket in front of them."""

    dev: DevStack
    client: TestClient[Any, Any]

    async def form(self, **body: Any) -> dict[str, Any]:
        headers = {"Authorization": f"Bearer {_ALICE_E2E_KEY}"}
        request = {**POST_POLICY, "max_object_bytes": 1000, **body}
        async with self.client.post("/v1/post-policy", json=request, headers=headers) as resp:
            assert resp.status == 200, await resp.text()
            reply: dict[str, Any] = await resp.json()
            return reply

    async def upload(self, form: dict[str, Any], fields: dict[str, str]) -> tuple[int, str]:
        data = aiohttp.FormData()
        for name, value in fields.items():
            data.add_field(name, value)
        data.add_field("file", b"\x89PNG....", filename="face.png", content_type="image/png")
        async with aiohttp.ClientSession() as session, session.post(form["host"], data=data) as r:
            return r.status, await r.text()


_ALICE_E2E_KEY = "canary-post-pins-alice"


@pytest.fixture
async def oss(tmp_path: Path, clock: FakeClock, aiohttp_client: Any) -> AsyncIterator[_Oss]:
    avatar = _with_callback_urls(_avatar_policy())
    policies = PolicySet({avatar.name: avatar})
    alice = {"id": "alice", "key_sha256": hash_api_key(_ALICE_E2E_KEY), "groups": ["browser"]}
    async with dev_stack(
        policies, POLICIES_DIR, tmp_path / "oss", port=0, clock=clock, extra_api_keys=[alice]
    ) as dev:
        client = await aiohttp_client(await start_test_server(dev.services))
        yield _Oss(dev, client)


_EVIL_CALLBACK = base64.b64encode(
    json.dumps({"callbackUrl": "https://evil.example.com/", "callbackBody": "user=bob"}).encode()
).decode()


@pytest.mark.parametrize("version", ["v4", "v1"])
@pytest.mark.parametrize(
    ("body", "tamper"),
    [
        ({}, {"callback": _EVIL_CALLBACK}),
        ({"callback": {"url": _CALLBACK_URL, "body": "k=${object}"}}, {"callback": _EVIL_CALLBACK}),
        ({}, {"x-oss-object-acl": "public-read"}),
        ({}, {"success_action_redirect": "https://evil.example.com/"}),
        ({"forbid_overwrite": True}, {"x-oss-forbid-overwrite": None}),
        ({"forbid_overwrite": True}, {"x-oss-forbid-overwrite": "false"}),
    ],
    ids=["added-callback", "swapped-callback", "acl", "redirect", "dropped-fwo", "false-fwo"],
)
async def test_oss_refuses_a_form_with_a_changed_pinned_field(
    oss: _Oss, version: str, body: dict[str, Any], tamper: dict[str, str | None]
) -> None:
    """At the OSS emulator: a changed callback, ACL, redirect or overwrite flag is 403."""
    form = await oss.form(signature_version=version, **body)
    fields = {**form["fields"], **tamper}
    status, text = await oss.upload(form, {k: v for k, v in fields.items() if v is not None})
    assert status == 403, text
    assert "Invalid according to Policy: Policy Condition failed" in text
    assert oss.dev.oss.read_object("examplebucket", "avatars/alice/face.png") is None


async def test_oss_takes_the_form_as_given_and_honours_forbid_overwrite(oss: _Oss) -> None:
    """The untouched form uploads; with forbid_overwrite a second upload to the key is refused."""
    form = await oss.form(key="avatars/alice/face.png", forbid_overwrite=True)
    status, text = await oss.upload(form, form["fields"])
    assert status == 204, text
    assert oss.dev.oss.read_object("examplebucket", "avatars/alice/face.png") == b"\x89PNG...."
    status, text = await oss.upload(form, form["fields"])
    assert status == 409, text
    assert "FileAlreadyExists" in text


async def test_oss_gets_exactly_the_callback_the_policy_allows(oss: _Oss) -> None:
    """A requested, allowlisted callback reaches OSS as signed (the emulator records, not calls)."""
    callback = {"url": _CALLBACK_URL, "body": "object=${object}"}
    form = await oss.form(key="avatars/alice/face.png", callback=callback)
    status, text = await oss.upload(form, form["fields"])
    assert status == 203, text  # OSS's answer when the callback does not succeed
    [recorded] = oss.dev.oss.callbacks
    assert (recorded.key, recorded.callback["callbackUrl"]) == (
        "avatars/alice/face.png",
        _CALLBACK_URL,
    )
    assert recorded.callback["callbackBody"] == "object=${object}"


# --- multipart_part_bytes: the parts the broker signs add up to max_object_bytes ---


def _part_policy(limit: int, part: int) -> Policy:
    return _avatar_policy().model_copy(
        update={"max_object_bytes": limit, "multipart_part_bytes": part}
    )


def _room(policy: Policy, number: int) -> int:
    """The largest content_length the broker signs for part ``number`` (0: none)."""
    try:
        check_part_size(policy, number, 0)
    except AccessDenied:
        return 0
    low, high = 0, 5 * 1024**3
    while low < high:  # bisect: check_part_size is monotone in the size
        middle = (low + high + 1) // 2
        try:
            check_part_size(policy, number, middle)
            low = middle
        except AccessDenied:
            high = middle - 1
    return low


@settings(max_examples=60, deadline=None, database=None)
@given(limit=st.integers(1, 5 * 1024**3), part=st.integers(102_400, 5 * 1024**3))
def test_signable_parts_add_up_to_exactly_the_limit(limit: int, part: int) -> None:
    """With multipart_part_bytes, the largest parts signable sum to max_object_bytes, no more."""
    policy = _part_policy(limit, part)
    last = math.ceil(limit / part)
    rooms = [_room(policy, number) for number in (1, last, last + 1)]
    assert rooms[0] == min(part, limit)
    assert rooms[1] == limit - (last - 1) * part > 0
    assert rooms[2] == 0
    assert (last - 1) * part + rooms[1] == limit


def test_part_size_refusals_say_what_is_allowed() -> None:
    """Past the last part, or over its room: 403 naming the sizes; without the field, no bound."""
    policy = _part_policy(250_000, 102_400)
    check_part_size(policy, 3, 45_200)
    with pytest.raises(AccessDenied, match="part 3 may be at most 45200 bytes"):
        check_part_size(policy, 3, 45_201)
    with pytest.raises(
        AccessDenied, match="part_number 4 is past policy avatar-upload's last part, 3"
    ):
        check_part_size(policy, 4, 1)
    unbounded = _avatar_policy().model_copy(update={"max_object_bytes": 250_000})
    check_part_size(unbounded, 10_000, 250_000)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"max_object_bytes": None}, "set both or neither"),
        ({"multipart_part_bytes": 102_399}, "102399 is out of range"),
    ],
)
def test_multipart_part_bytes_is_checked_at_load(changes: dict[str, Any], problem: str) -> None:
    """multipart_part_bytes needs max_object_bytes and OSS's 100 KiB minimum part."""
    data = {**_avatar_policy().model_dump(), "multipart_part_bytes": 102_400, **changes}
    data = {key: value for key, value in data.items() if value is not None}
    with pytest.raises(ValueError, match=problem):
        Policy.model_validate(data)
