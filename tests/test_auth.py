"""Request credentials → Principal (broker.auth): token extraction, API keys, certificates, names.

The pure rules are pinned directly; the wire rules (a token in the header and
the query, given twice, with CR/LF) through the real server on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import MultiDict

from broker.auth import (
    ApiKeyAuthenticator,
    Authenticator,
    CertificateAuthenticator,
    Revocations,
    allowance,
    api_key_authenticator,
    certificate_authenticator,
    extract_token,
    generate_api_key,
    hash_api_key,
    quota_key,
    revoked_session_names,
    role_session_name,
)
from broker.config import ApiKeyAllowSettings, Settings
from broker.errors import AuthenticationFailed, ConfigError, RequestInvalid
from broker.models import Allowance, Principal
from broker.names import CALLER_ID_PATTERN, is_caller_id
from broker.oidc import MAX_TOKEN_CHARS
from tests.conftest import BrokerHarness
from tests.wire import (
    ALICE_KEY,
    bearer_header,
    error_code,
    raw_request,
    raw_status,
    send,
    send_raw,
)

_BOUNDED = settings(max_examples=200, deadline=None, database=None)
_SESSION_NAME = re.compile(r"[A-Za-z0-9.@_-]{2,64}")  # STS's RoleSessionName rule
_KEYS = {"svc-a": hash_api_key("key-of-svc-a"), "svc-b": hash_api_key("key-of-svc-b")}
_GROUPS = {"svc-a": ("internal",)}

# --- extract_token ---


@pytest.mark.parametrize(
    "header", ["Bearer tok-1", "bearer tok-1", "BEARER tok-1", "  Bearer   tok-1  "]
)
def test_bearer_header_gives_its_token(header: str) -> None:
    """The Bearer scheme is case-insensitive and surrounding blanks are dropped."""
    assert extract_token([header], {}) == "tok-1"


def test_access_token_is_used_without_a_header() -> None:
    """Without an Authorization header, ?access_token= carries the token."""
    assert extract_token([], {"access_token": "tok-2"}) == "tok-2"


@pytest.mark.parametrize("header", ["Basic dXNlcjpwYXNz", "Bearer", "Bearer    ", "tok-1", ""])
def test_other_schemes_and_empty_tokens_fail_authentication(header: str) -> None:
    """A scheme other than Bearer, or a Bearer without a token, is 401."""
    with pytest.raises(AuthenticationFailed):
        extract_token([header], {})


def test_no_token_at_all_fails_authentication() -> None:
    """No header and no (or an empty) access_token is 401."""
    for query in ({}, {"access_token": ""}):
        with pytest.raises(AuthenticationFailed):
            extract_token([], query)


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        (["Bearer a"], {"access_token": "b"}),
        (["Bearer a", "Bearer b"], {}),
        ([], MultiDict([("access_token", "a"), ("access_token", "b")])),
    ],
    ids=["header-and-query", "two-headers", "two-access-tokens"],
)
def test_ambiguous_tokens_are_invalid(headers: list[str], query: MultiDict[str]) -> None:
    """A token in both places, or either given twice, is 400: the broker never picks one."""
    with pytest.raises(RequestInvalid):
        extract_token(headers, query)


def test_oversized_token_fails_before_any_parsing() -> None:
    """A token over MAX_TOKEN_CHARS is refused as 401, from the header or the query."""
    token = "a" * (MAX_TOKEN_CHARS + 1)
    with pytest.raises(AuthenticationFailed):
        extract_token([f"Bearer {token}"], {})
    with pytest.raises(AuthenticationFailed):
        extract_token([], {"access_token": token})
    assert extract_token([], {"access_token": token[:-1]}) == token[:-1]


# --- API keys ---


def test_hash_api_key_is_the_hex_sha256_of_the_utf8_key() -> None:
    """key_sha256 is sha256 of the key's UTF-8 bytes, in lower-case hex (a published vector)."""
    assert hash_api_key("abc") == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert hash_api_key("ключ") == hashlib.sha256("ключ".encode()).hexdigest()


def test_generated_keys_are_random_url_safe_and_long() -> None:
    """A generated key is sk_ and 43 URL-safe characters (256 bits), new every time."""
    keys = {generate_api_key() for _ in range(32)}
    assert len(keys) == 32
    for key in keys:
        assert re.fullmatch(r"sk_[A-Za-z0-9_-]{43}", key), key


def test_api_key_maps_to_its_caller_and_groups() -> None:
    """The right key gives its caller (auth_method api_key) with its configured groups."""
    authenticator = ApiKeyAuthenticator(_KEYS, _GROUPS)
    assert authenticator.authenticate("key-of-svc-a") == Principal("svc-a", ("internal",))
    assert authenticator.authenticate("key-of-svc-b") == Principal("svc-b", ())


@pytest.mark.parametrize(
    "token", ["key-of-svc-", "key-of-svc-a ", "KEY-OF-SVC-A", "", _KEYS["svc-a"], "\ud800"]
)
def test_anything_but_the_exact_key_matches_nobody(token: str) -> None:
    """Near misses, the digest itself and unencodable text match no caller (and never raise)."""
    assert ApiKeyAuthenticator(_KEYS, _GROUPS).authenticate(token) is None


def test_two_callers_with_one_key_are_refused() -> None:
    """One key configured for two callers is a config error naming both (whose would it be?)."""
    digest = hash_api_key("shared")
    with pytest.raises(ConfigError, match="first and second have the same key"):
        ApiKeyAuthenticator({"first": digest, "second": digest}, {})


def test_the_last_of_a_thousand_keys_maps_to_its_caller() -> None:
    """With 1,000 keys configured, the last one maps to its caller and an unknown key to none."""
    keys = {f"svc-{i}": hash_api_key(f"key-{i}") for i in range(1000)}
    authenticator = ApiKeyAuthenticator(keys, {})
    assert len(authenticator) == 1000
    principal = authenticator.authenticate("key-999")
    assert principal is not None
    assert principal.subject == "svc-999"
    assert authenticator.authenticate("key-1000") is None


def test_restricted_key_carries_its_allowance() -> None:
    """A key configured with allow yields a caller carrying it; other keys carry none."""
    allow = Allowance(routes=frozenset({"credentials"}), policies=frozenset({"service-uploads"}))
    authenticator = ApiKeyAuthenticator(_KEYS, _GROUPS, {"svc-a": allow})
    restricted = authenticator.authenticate("key-of-svc-a")
    assert restricted == Principal("svc-a", ("internal",), allow=allow)
    assert restricted.allow is not None
    assert restricted.allow.allows_route("credentials")
    assert not restricted.allow.allows_route("presign")
    assert not restricted.allow.allows_policy("reports-read")
    other = authenticator.authenticate("key-of-svc-b")
    assert other is not None
    assert other.allow is None


def test_allowance_leaves_out_what_is_not_restricted() -> None:
    """allow with only policies restricts policies and leaves every route open."""
    settings = ApiKeyAllowSettings.model_validate({"policies": ["service-uploads"]})
    allow = allowance(settings)
    assert allow == Allowance(routes=None, policies=frozenset({"service-uploads"}))
    assert allow.allows_route("post_policy")
    assert allowance(None) is None


def test_api_key_authenticator_reads_ids_groups_and_allow_from_settings() -> None:
    """Every configured key authenticates as its id, with its groups and restriction."""
    keys = [
        {"id": "svc-a", "key_sha256": hash_api_key("ka"), "groups": ["internal"]},
        {"id": "svc-p", "key_sha256": hash_api_key("kp"), "allow": {"routes": ["credentials"]}},
    ]
    settings = Settings.model_validate({"auth": {"api_keys": keys}})
    authenticator = api_key_authenticator(settings, environ={})
    assert authenticator.authenticate("ka") == Principal("svc-a", ("internal",))
    assert authenticator.authenticate("kp") == Principal(
        "svc-p", (), allow=Allowance(routes=frozenset({"credentials"}))
    )


async def test_authenticator_uses_api_keys_when_no_jwt_is_configured() -> None:
    """Without a JWT verifier even a JWT-shaped token is looked up as a key: 401 if unknown."""
    authenticator = Authenticator(ApiKeyAuthenticator(_KEYS, _GROUPS))
    assert (await authenticator.authenticate("key-of-svc-b")).subject == "svc-b"
    with pytest.raises(AuthenticationFailed):
        await authenticator.authenticate("eyJhbGciOiJSUzI1NiJ9.e30.c2ln")
    assert authenticator.authenticate_certificate({"subject": ()}) is None


# --- client certificates ---


def _peercert(*common_names: str, sans: tuple[tuple[str, str], ...] = ()) -> dict[str, object]:
    """A peer certificate as ``ssl.getpeercert()`` returns it."""
    rdns = [(("countryName", "CN"),), *((("commonName", name),) for name in common_names)]
    cert: dict[str, object] = {"subject": tuple(rdns)}
    if sans:
        cert["subjectAltName"] = sans
    return cert


_EDGE = Principal("svc-edge", ("internal",), auth_method="mtls")
_SPIFFE = Principal("svc-spiffe", ("internal",), auth_method="mtls")
_DNS = Principal("svc-dns", ("internal",), auth_method="mtls")
_SPIFFE_ID = "spiffe://example.org/ns/prod/sa/reports"
_CALLERS = {
    ("common_name", "edge.internal"): _EDGE,
    ("uri", _SPIFFE_ID): _SPIFFE,
    ("dns", "reports.internal.example.com"): _DNS,
}


def test_certificate_common_name_maps_to_its_caller() -> None:
    """A verified certificate with one known common name (and no SAN) gives that caller."""
    assert CertificateAuthenticator(_CALLERS).authenticate(_peercert("edge.internal")) == _EDGE


@pytest.mark.parametrize(
    "peercert",
    [None, {}, _peercert(), _peercert("other.internal"), _peercert("edge.internal", "x")],
    ids=["none", "empty", "no-cn", "unknown-cn", "two-cns"],
)
def test_certificates_without_exactly_one_known_cn_match_nobody(
    peercert: dict[str, object] | None,
) -> None:
    """No certificate, no common name, an unknown one or two of them: no caller."""
    assert CertificateAuthenticator(_CALLERS).authenticate(peercert) is None


@pytest.mark.parametrize(
    ("peercert", "caller"),
    [
        (_peercert("edge.internal", sans=(("URI", _SPIFFE_ID),)), _SPIFFE),
        (_peercert("edge.internal", sans=(("DNS", "Reports.Internal.Example.COM"),)), _DNS),
        (
            _peercert(
                "edge.internal",
                sans=(("DNS", "reports.internal.example.com"), ("URI", _SPIFFE_ID)),
            ),
            _SPIFFE,
        ),
        (_peercert("edge.internal", sans=(("IP Address", "10.0.0.1"),)), _EDGE),
        (_peercert(sans=(("URI", "spiffe://example.org/other"), ("URI", _SPIFFE_ID))), _SPIFFE),
    ],
    ids=["uri-over-cn", "dns-any-case-over-cn", "uri-over-dns", "ip-san-ignored", "one-uri-known"],
)
def test_the_most_specific_certificate_name_wins(
    peercert: dict[str, object], caller: Principal
) -> None:
    """SAN URIs, else SAN DNS names (any case), else the common name identify the caller."""
    assert CertificateAuthenticator(_CALLERS).authenticate(peercert) == caller


@pytest.mark.parametrize(
    "peercert",
    [
        _peercert("edge.internal", sans=(("URI", "spiffe://example.org/unknown"),)),
        _peercert("edge.internal", sans=(("DNS", "unknown.example.com"),)),
        _peercert(sans=(("URI", "spiffe://x/y"), ("DNS", "reports.internal.example.com"))),
    ],
    ids=["unknown-uri-hides-cn", "unknown-dns-hides-cn", "unknown-uri-hides-dns"],
)
def test_a_san_is_never_bypassed_by_a_less_specific_name(peercert: dict[str, object]) -> None:
    """SANs that match nobody: the certificate is not matched by its known CN or DNS name."""
    assert CertificateAuthenticator(_CALLERS).authenticate(peercert) is None


def test_names_matching_two_callers_match_nobody() -> None:
    """Two SAN URIs of one certificate naming two different callers: ambiguous, refused."""
    callers = {**_CALLERS, ("uri", "spiffe://example.org/other"): _EDGE}
    peercert = _peercert(sans=(("URI", _SPIFFE_ID), ("URI", "spiffe://example.org/other")))
    assert CertificateAuthenticator(callers).authenticate(peercert) is None


def test_certificate_callers_come_from_each_configured_name() -> None:
    """auth.mtls entries by uri, dns (any case) and common_name become the authenticator's map."""
    settings = Settings.model_validate(
        {
            "auth": {
                "mtls": [
                    {"id": "svc-spiffe", "uri": _SPIFFE_ID, "groups": ["internal"]},
                    {"id": "svc-dns", "dns": "Reports.Internal.Example.com"},
                    {"id": "svc-edge", "common_name": "edge.internal"},
                ]
            }
        }
    )
    authenticator = certificate_authenticator(settings)
    assert authenticator is not None
    by_dns = authenticator.authenticate(
        _peercert(sans=(("DNS", "reports.internal.example.com"),))
    )
    assert by_dns is not None
    assert (by_dns.subject, by_dns.auth_method) == ("svc-dns", "mtls")
    by_uri = authenticator.authenticate(_peercert(sans=(("URI", _SPIFFE_ID),)))
    assert by_uri is not None
    assert (by_uri.subject, by_uri.groups) == ("svc-spiffe", ("internal",))
    assert certificate_authenticator(Settings()) is None


# --- names derived from a caller ---

_SUBJECTS = st.from_regex(re.compile(CALLER_ID_PATTERN), fullmatch=True).filter(is_caller_id)


@_BOUNDED
@given(subject=_SUBJECTS, auth_method=st.sampled_from(["api_key", "mtls", "jwt"]))
def test_role_session_name_always_fits_sts(subject: str, auth_method: str) -> None:
    """Every caller's RoleSessionName is 2-64 of [A-Za-z0-9.@_-], as STS requires."""
    name = role_session_name(Principal(subject, auth_method=auth_method))
    assert _SESSION_NAME.fullmatch(name), name


def test_role_session_name_shows_configured_callers_as_they_are() -> None:
    """API-key and mTLS callers appear under their id; a one-character id is padded."""
    assert role_session_name(Principal("svc-reports")) == "svc-reports"
    assert role_session_name(Principal("svc-edge", auth_method="mtls")) == "svc-edge"
    assert role_session_name(Principal("a")) == "a.caller"


def test_jwt_callers_never_share_a_session_name_with_a_service() -> None:
    """A JWT subject equal to a service id gets a u. prefix, so never that service's session."""
    service = role_session_name(Principal("svc-reports"))
    browser = role_session_name(Principal("svc-reports", auth_method="jwt"))
    assert (service, browser) == ("svc-reports", "u.svc-reports")


def test_long_subjects_keep_their_start_and_end_in_a_digest() -> None:
    """Over 64 characters, the name keeps the start and ends in a digest of the whole subject."""
    first = role_session_name(Principal("a" * 63 + "1", auth_method="jwt"))
    second = role_session_name(Principal("a" * 63 + "2", auth_method="jwt"))
    assert len(first) == len(second) == 64
    assert first.startswith("u.aaaa")
    assert first != second


def test_quota_key_separates_kinds_of_caller() -> None:
    """A JWT subject never shares a rate-limit bucket with the API-key caller of the same id."""
    assert quota_key(Principal("alice")) == "api_key:alice"
    assert quota_key(Principal("alice", auth_method="jwt")) == "jwt:alice"


# --- on the wire ---


async def test_template_syntax_in_access_token_is_just_a_wrong_key(broker: BrokerHarness) -> None:
    """An access_token of ${subject} or a wildcard authenticates nobody: 401."""
    for token in ("${subject}", "*", "%2A"):
        status, reply = await send(
            broker, "GET", f"/v1/credentials/avatar-upload?access_token={token}", caller=None
        )
        assert (status, error_code(reply)) == (401, "AuthenticationFailed")
    assert broker.sts.emulator.calls == []


async def test_crlf_in_access_token_is_a_wrong_key(broker: BrokerHarness) -> None:
    """An access_token with encoded CR/LF is 401 and injects no header."""
    target = (
        b"/v1/credentials/avatar-upload?access_token=" + ALICE_KEY.encode() + b"%0D%0AX-Evil:%201"
    )
    reply = await send_raw(broker, raw_request(target))
    assert raw_status(reply) == 401
    assert b"x-evil" not in reply.lower()


async def test_token_in_header_and_query_is_400(broker: BrokerHarness) -> None:
    """A bearer header and an access_token together are 400, whichever is valid."""
    status, reply = await send(
        broker, "GET", "/v1/credentials/avatar-upload?access_token=other", caller="alice"
    )
    assert (status, error_code(reply)) == (400, "RequestInvalid")


async def test_access_token_given_twice_is_400(broker: BrokerHarness) -> None:
    """access_token given twice is 400 RequestInvalid, before STS, even when both are valid."""
    query = f"access_token={ALICE_KEY}&access_token={ALICE_KEY}"
    status, reply = await send(broker, "GET", f"/v1/credentials/avatar-upload?{query}", caller=None)
    assert (status, error_code(reply)) == (400, "RequestInvalid")
    assert broker.sts.emulator.calls == []


async def test_two_authorization_headers_are_400(broker: BrokerHarness) -> None:
    """Two Authorization headers are ambiguous and refused, like access_token given twice."""
    reply = await send_raw(
        broker, raw_request(b"/v1/policies", bearer_header(), b"Authorization: Bearer someone-else")
    )
    assert raw_status(reply) == 400


def test_revocations_keep_configured_ids_and_jwt_subjects_apart() -> None:
    """A revoked id refuses API-key and mTLS callers only; a revoked subject, JWT users only."""
    revoked = Revocations(callers=frozenset({"alice"}), subjects=frozenset({"bob"}))
    assert revoked.refuses(Principal("alice"))
    assert revoked.refuses(Principal("alice", auth_method="mtls"))
    assert not revoked.refuses(Principal("alice", auth_method="jwt"))
    assert revoked.refuses(Principal("bob", auth_method="jwt"))
    assert not revoked.refuses(Principal("bob"))
    assert revoked_session_names(revoked) == {"alice", "u.bob"}


async def test_revoked_key_is_refused_as_an_unknown_key() -> None:
    """A revoked API key gets the same AuthenticationFailed as a key nobody configured."""
    keys = ApiKeyAuthenticator({"alice": hash_api_key("k-alice"), "svc": hash_api_key("k-svc")}, {})
    authenticator = Authenticator(keys, revoked=Revocations(callers=frozenset({"alice"})))
    with pytest.raises(AuthenticationFailed) as revoked:
        await authenticator.authenticate("k-alice")
    with pytest.raises(AuthenticationFailed) as unknown:
        await authenticator.authenticate("k-nobody")
    assert (revoked.value.status, str(revoked.value)) == (unknown.value.status, str(unknown.value))
    assert (await authenticator.authenticate("k-svc")).subject == "svc"
