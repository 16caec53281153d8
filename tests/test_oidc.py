"""JWT bearer tokens → Principal: algorithms, claims, time, JWKS caching and refetching."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding
from cryptography.hazmat.primitives.asymmetric.ec import (
    SECP256R1,
    EllipticCurvePrivateKey,
    generate_private_key,
)
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from cryptography.hazmat.primitives.asymmetric.rsa import generate_private_key as new_rsa_key
from jwt.algorithms import ECAlgorithm, RSAAlgorithm
from structlog.testing import capture_logs

from broker.config import JwtSettings
from broker.errors import AuthenticationFailed, IdentityProviderUnavailable, TemplateValueRejected
from broker.oidc import MAX_TOKEN_CHARS, JwksSource, JwtVerifier, looks_like_jwt
from tests.conftest import (
    POLICIES_DIR,
    BrokerFactory,
    BrokerHarness,
    FakeClock,
    free_port,
    write_jwks,
)
from tests.wire import error_code, send

ISSUER = "https://idp.example.com/"
AUDIENCE = "upload-web"
COOLDOWN = 60.0
RETRY = 5.0
MAX_AGE = 3600.0


@dataclass(frozen=True)
class Keys:
    rsa: RSAPrivateKey
    rsa_new: RSAPrivateKey
    rsa_unpublished: RSAPrivateKey
    ec: EllipticCurvePrivateKey


@pytest.fixture(scope="module")
def keys() -> Keys:
    def new_rsa() -> RSAPrivateKey:
        return new_rsa_key(public_exponent=65537, key_size=2048)

    return Keys(new_rsa(), new_rsa(), new_rsa(), generate_private_key(SECP256R1()))


def rsa_jwk(key: RSAPrivateKey, kid: str) -> dict[str, Any]:
    return {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "use": "sig"}


def ec_jwk(key: EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    return {**ECAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "ES256"}


def claims(clock: FakeClock, **overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(clock.now),
        "exp": int(clock.now) + 300,
        "tenant": "acme",
        "name": "Alice Liddell",
        "groups": ["editors"],
    }
    base.update(overrides)
    return {name: value for name, value in base.items() if value is not None}


def sign(payload: dict[str, Any], key: Any, alg: str = "RS256", kid: str | None = "rsa-1") -> str:
    headers = {} if kid is None else {"kid": kid}
    return jwt.encode(payload, key, algorithm=alg, headers=headers)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token built by hand, for algorithms PyJWT refuses to produce."""
    return (
        f"{b64(json.dumps(header).encode())}.{b64(json.dumps(payload).encode())}.{b64(signature)}"
    )


def assert_generic(err: pytest.ExceptionInfo[Exception], *secrets_: str) -> None:
    text = f"{err.value} {err.value.args} {getattr(err.value, 'context', {})}"
    for secret in secrets_:
        assert secret not in text


@dataclass
class JwksServer:
    url: str
    jwks: dict[str, Any]
    hits: int = 0
    status: int = 200
    paths: list[str] = field(default_factory=list)


@pytest.fixture
async def jwks_server(
    aiohttp_server: Callable[[web.Application], Awaitable[TestServer]], keys: Keys
) -> JwksServer:
    state = JwksServer(url="", jwks={"keys": [rsa_jwk(keys.rsa, "rsa-1"), ec_jwk(keys.ec, "ec-1")]})

    async def serve(request: web.Request) -> web.Response:
        state.hits += 1
        if state.status != 200:
            return web.Response(status=state.status)
        return web.json_response(state.jwks)

    app = web.Application()
    app.router.add_get("/jwks", serve)
    server = await aiohttp_server(app)
    state.url = str(server.make_url("/jwks"))
    return state


def settings(**overrides: Any) -> JwtSettings:
    data: dict[str, Any] = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_url": "https://idp.example.com/jwks",
        "groups": ["browser"],
        "groups_claim": "groups",
        **overrides,
    }
    return JwtSettings.model_validate(data)


@dataclass
class Harness:
    verifier: JwtVerifier
    source: JwksSource
    server: JwksServer
    clock: FakeClock


@pytest.fixture
def harness(jwks_server: JwksServer, clock: FakeClock) -> Harness:
    source = JwksSource(
        jwks_url=jwks_server.url,
        clock=clock,
        refetch_cooldown_seconds=COOLDOWN,
        retry_seconds=RETRY,
        max_age_seconds=MAX_AGE,
        timeout_seconds=2,
    )
    return Harness(JwtVerifier(settings(), source, clock=clock), source, jwks_server, clock)


# --- valid tokens ---


async def test_rs256_token_from_jwks_file_yields_principal(
    tmp_path: Path, keys: Keys, clock: FakeClock
) -> None:
    """A valid RS256 token checked against a JWKS file gives subject, groups and safe claims."""
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(keys.rsa, "rsa-1")]}))
    source = JwksSource(jwks_file=path, clock=clock)
    verifier = JwtVerifier(settings(jwks_url=None, jwks_file=path), source, clock=clock)
    principal = await verifier.verify(sign(claims(clock), keys.rsa))
    assert principal.subject == "alice"
    assert principal.groups == ("browser", "editors")
    assert principal.auth_method == "jwt"
    assert principal.claims["tenant"] == "acme"
    assert principal.claims["sub"] == "alice"
    assert "name" not in principal.claims  # a space is not a safe template value
    assert "iss" not in principal.claims  # nor is a URL
    assert "exp" not in principal.claims  # nor a number
    assert source.fetches == 1


async def test_es256_token_from_jwks_url_yields_principal(harness: Harness, keys: Keys) -> None:
    """A valid ES256 token checked against a JWKS served over HTTP gives a Principal."""
    token = sign(claims(harness.clock, sub="bob@example.com"), keys.ec, "ES256", "ec-1")
    principal = await harness.verifier.verify(token)
    assert principal.subject == "bob@example.com"
    assert principal.groups == ("browser", "editors")
    assert harness.server.hits == 1


async def test_keys_are_cached_between_tokens(harness: Harness, keys: Keys) -> None:
    """Many tokens within max_age cost a single JWKS fetch."""
    for _ in range(5):
        await harness.verifier.verify(sign(claims(harness.clock), keys.rsa))
    assert harness.server.hits == 1
    assert harness.source.fetches == 1


async def test_token_without_kid_uses_the_only_fitting_key(harness: Harness, keys: Keys) -> None:
    """A kid-less token is accepted when exactly one key fits its algorithm."""
    principal = await harness.verifier.verify(sign(claims(harness.clock), keys.rsa, kid=None))
    assert principal.subject == "alice"


async def test_aud_list_containing_audience_accepted(harness: Harness, keys: Keys) -> None:
    """An aud list that contains the configured audience is accepted."""
    token = sign(claims(harness.clock, aud=["other-app", AUDIENCE]), keys.rsa)
    assert (await harness.verifier.verify(token)).subject == "alice"


# --- algorithms and keys ---


async def test_alg_none_refused(harness: Harness) -> None:
    """An unsigned token (alg none) is refused."""
    token = forge({"alg": "none", "kid": "rsa-1"}, claims(harness.clock))
    with pytest.raises(AuthenticationFailed) as err:
        await harness.verifier.verify(token)
    assert_generic(err, token)


async def test_hs256_signed_with_public_key_pem_refused(harness: Harness, keys: Keys) -> None:
    """HS256 'signed' with the RSA public key PEM as the HMAC secret is refused."""
    pem = keys.rsa.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header, payload = {"alg": "HS256", "typ": "JWT", "kid": "rsa-1"}, claims(harness.clock)
    unsigned = forge(header, payload).rsplit(".", 1)[0]
    signature = hmac.new(pem, unsigned.encode(), hashlib.sha256).digest()
    token = f"{unsigned}.{b64(signature)}"
    with pytest.raises(AuthenticationFailed) as err:
        await harness.verifier.verify(token)
    assert_generic(err, token, pem.decode())
    with pytest.raises(AuthenticationFailed):
        await harness.source.key_for("rsa-1", "HS256")


@pytest.mark.parametrize("alg", ["HS256", "hs512", "none", "RS1", "ES256K"])
def test_unsafe_or_unknown_algorithms_refused_at_construction(alg: str) -> None:
    """The allowlist may not name none, any HMAC algorithm or an unsupported one."""
    source = JwksSource(jwks_url="https://idp.example.com/jwks")
    with pytest.raises(ValueError, match="algorithms"):
        JwtVerifier(settings(algorithms=["RS256", alg]), source)


async def test_algorithm_outside_allowlist_refused(harness: Harness, keys: Keys) -> None:
    """A valid ES256 token is refused when the allowlist is RS256 only."""
    verifier = JwtVerifier(settings(algorithms=["RS256"]), harness.source, clock=harness.clock)
    with pytest.raises(AuthenticationFailed):
        await verifier.verify(sign(claims(harness.clock), keys.ec, "ES256", "ec-1"))


async def test_rsa_jwk_never_verifies_es256(harness: Harness, keys: Keys) -> None:
    """An ES256 token naming the RSA key's kid is refused: key type must fit the algorithm."""
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(sign(claims(harness.clock), keys.ec, "ES256", "rsa-1"))
    with pytest.raises(AuthenticationFailed):
        await harness.source.key_for("rsa-1", "ES256")
    with pytest.raises(AuthenticationFailed):
        await harness.source.key_for("ec-1", "RS256")


async def test_jwk_alg_must_match_token_alg(harness: Harness, keys: Keys) -> None:
    """A JWK that declares alg RS256 is not used for a PS256 token."""
    harness.server.jwks = {"keys": [{**rsa_jwk(keys.rsa, "rsa-1"), "alg": "RS256"}]}
    verifier = JwtVerifier(settings(algorithms=["PS256"]), harness.source, clock=harness.clock)
    with pytest.raises(AuthenticationFailed):
        await verifier.verify(sign(claims(harness.clock), keys.rsa, "PS256", "rsa-1"))


async def test_bad_signature_refused(harness: Harness, keys: Keys) -> None:
    """A token signed by another key under a published kid is refused."""
    token = sign(claims(harness.clock), keys.rsa_unpublished, kid="rsa-1")
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(token)


async def test_private_and_hmac_jwks_entries_ignored(
    tmp_path: Path, keys: Keys, clock: FakeClock
) -> None:
    """Private JWKs and oct (HMAC) JWKs in the set are never used to verify."""
    private = {**RSAAlgorithm.to_jwk(keys.rsa, as_dict=True), "kid": "rsa-1"}
    octet = {"kty": "oct", "kid": "hs", "k": b64(b"shared-secret-shared-secret-12345")}
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [private, octet, ec_jwk(keys.ec, "ec-1")]}))
    source = JwksSource(jwks_file=path, clock=clock)
    verifier = JwtVerifier(settings(jwks_url=None, jwks_file=path), source, clock=clock)
    with pytest.raises(AuthenticationFailed):
        await verifier.verify(sign(claims(clock), keys.rsa, kid="rsa-1"))
    with pytest.raises(AuthenticationFailed):
        await source.key_for("hs", "HS256")


async def test_short_rsa_key_refused(tmp_path: Path, clock: FakeClock) -> None:
    """An RSA key below 2048 bits never verifies a token."""
    weak = new_rsa_key(public_exponent=65537, key_size=1024)  # noqa: S505 - the point of the test
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [rsa_jwk(weak, "rsa-1")]}))
    source = JwksSource(jwks_file=path, clock=clock)
    verifier = JwtVerifier(settings(jwks_url=None, jwks_file=path), source, clock=clock)
    unsigned = forge({"alg": "RS256", "kid": "rsa-1"}, claims(clock)).rsplit(".", 1)[0]
    signature = weak.sign(unsigned.encode(), padding.PKCS1v15(), hashes.SHA256())
    token = f"{unsigned}.{b64(signature)}"
    with pytest.raises(AuthenticationFailed):
        await verifier.verify(token)


# --- issuer and audience ---


async def test_wrong_audience_refused(harness: Harness, keys: Keys) -> None:
    """A token for another audience is refused without naming it."""
    token = sign(claims(harness.clock, aud="other-app-7c1"), keys.rsa)
    with pytest.raises(AuthenticationFailed) as err:
        await harness.verifier.verify(token)
    assert_generic(err, token, "other-app-7c1")


async def test_missing_audience_refused(harness: Harness, keys: Keys) -> None:
    """A token without aud is refused."""
    token = sign(claims(harness.clock, aud=None), keys.rsa)
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(token)


@pytest.mark.parametrize(
    "issuer",
    [
        "https://idp.example.com",  # prefix (no trailing slash)
        "https://idp.example.co",  # prefix
        "https://idp.example.com/evil",  # superstring
        "https://idp.example.com//",  # superstring, extra slash
        "https://IDP.example.com/",  # case differs
        None,  # missing
    ],
)
async def test_issuer_must_match_exactly(harness: Harness, keys: Keys, issuer: str | None) -> None:
    """Only the exact configured issuer is accepted: no prefix, superstring or slash variant."""
    token = sign(claims(harness.clock, iss=issuer), keys.rsa)
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(token)


# --- time ---


async def test_expired_token_refused(harness: Harness, keys: Keys) -> None:
    """A token is refused once the clock passes exp plus the leeway."""
    token = sign(claims(harness.clock), keys.rsa)
    await harness.verifier.verify(token)
    harness.clock.advance(300 + 31)
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(token)


async def test_expired_within_leeway_accepted(harness: Harness, keys: Keys) -> None:
    """A token expired by less than the 30 s leeway is still accepted."""
    token = sign(claims(harness.clock), keys.rsa)
    harness.clock.advance(300 + 20)
    assert (await harness.verifier.verify(token)).subject == "alice"


async def test_missing_exp_refused(harness: Harness, keys: Keys) -> None:
    """A token without exp is refused."""
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(sign(claims(harness.clock, exp=None), keys.rsa))


async def test_not_yet_valid_refused_then_accepted(harness: Harness, keys: Keys) -> None:
    """A token with nbf beyond the leeway is refused until the clock reaches it."""
    now = int(harness.clock.now)
    token = sign(claims(harness.clock, nbf=now + 120, exp=now + 600), keys.rsa)
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(token)
    harness.clock.advance(100)  # nbf is now 20 s ahead: within leeway
    assert (await harness.verifier.verify(token)).subject == "alice"


async def test_iat_in_the_future_refused(harness: Harness, keys: Keys) -> None:
    """A token issued beyond the leeway in the future is refused."""
    token = sign(claims(harness.clock, iat=int(harness.clock.now) + 120), keys.rsa)
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(token)


async def test_non_numeric_exp_refused(harness: Harness, keys: Keys) -> None:
    """An exp that is not a number is refused."""
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(sign(claims(harness.clock, exp="never"), keys.rsa))


# --- kid handling and JWKS refresh ---


async def test_unknown_kid_flood_costs_at_most_one_fetch(harness: Harness, keys: Keys) -> None:
    """200 tokens with random kids cause at most one JWKS fetch; good tokens keep working."""
    good = sign(claims(harness.clock), keys.rsa)
    await harness.verifier.verify(good)
    harness.clock.advance(COOLDOWN + 1)  # a refetch is allowed again
    flood = [
        sign(claims(harness.clock), keys.rsa_unpublished, kid=secrets.token_hex(8))
        for _ in range(200)
    ]
    results = await asyncio.gather(
        *(harness.verifier.verify(token) for token in flood), return_exceptions=True
    )
    assert all(isinstance(result, AuthenticationFailed) for result in results)
    for token in flood[:50]:  # sequential, still within the cooldown
        with pytest.raises(AuthenticationFailed):
            await harness.verifier.verify(token)
    assert harness.server.hits == 2
    assert harness.source.fetches == 2
    assert (await harness.verifier.verify(good)).subject == "alice"


async def test_rotated_key_picked_up_after_cooldown(harness: Harness, keys: Keys) -> None:
    """A new kid published at the URL is used once the refetch cooldown has passed."""
    await harness.verifier.verify(sign(claims(harness.clock), keys.rsa))
    harness.server.jwks = {"keys": [rsa_jwk(keys.rsa_new, "rsa-2"), ec_jwk(keys.ec, "ec-1")]}
    rotated = sign(
        claims(harness.clock, exp=int(harness.clock.now) + 900), keys.rsa_new, kid="rsa-2"
    )
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(rotated)
    assert harness.server.hits == 1
    harness.clock.advance(COOLDOWN + 1)
    assert (await harness.verifier.verify(rotated)).subject == "alice"
    assert harness.server.hits == 2


async def test_concurrent_first_use_shares_one_fetch(harness: Harness, keys: Keys) -> None:
    """Many concurrent first requests share a single JWKS fetch."""
    token = sign(claims(harness.clock), keys.rsa)
    principals = await asyncio.gather(*(harness.verifier.verify(token) for _ in range(20)))
    assert {principal.subject for principal in principals} == {"alice"}
    assert harness.server.hits == 1


async def test_jwks_refetched_after_max_age(harness: Harness, keys: Keys) -> None:
    """The JWKS URL is fetched again once max_age has passed."""
    await harness.verifier.verify(sign(claims(harness.clock), keys.rsa))
    harness.clock.advance(MAX_AGE + 1)
    await harness.verifier.verify(sign(claims(harness.clock), keys.rsa))
    assert harness.server.hits == 2


async def test_failed_fetch_keeps_previous_keys(harness: Harness, keys: Keys) -> None:
    """When a refetch fails the cached keys stay in force, and the failure is logged safely."""
    await harness.verifier.verify(sign(claims(harness.clock), keys.rsa))
    harness.server.status = 500
    harness.clock.advance(MAX_AGE + 1)
    token = sign(claims(harness.clock), keys.rsa)
    with capture_logs() as logs:
        assert (await harness.verifier.verify(token)).subject == "alice"
    assert harness.server.hits == 2
    assert [entry["event"] for entry in logs] == ["jwks_load_failed"]
    assert token not in repr(logs)


async def test_first_fetch_failure_is_503_and_retried_seconds_later(
    harness: Harness, keys: Keys
) -> None:
    """No keys and a failing URL: 503 with Retry-After, one fetch per RETRY, then recovery."""
    harness.server.status = 503
    token = sign(claims(harness.clock), keys.rsa)
    for _ in range(10):
        with pytest.raises(IdentityProviderUnavailable) as err:
            await harness.verifier.verify(token)
        assert err.value.retry_after_seconds == RETRY
    assert harness.server.hits == 1
    harness.server.status = 200
    harness.clock.advance(RETRY - 1)
    with pytest.raises(IdentityProviderUnavailable) as err:
        await harness.verifier.verify(token)
    assert err.value.retry_after_seconds == 1
    harness.clock.advance(1)  # RETRY after the failure, far less than the cooldown
    assert (await harness.verifier.verify(token)).subject == "alice"
    assert harness.server.hits == 2


# --- identity provider outages: a real JWKS server switched off, on and slow ---


class SwitchableJwks:
    """A JWKS endpoint on 127.0.0.1 that a test switches off (connection refused), on, or slow.

    While ``slow``, each request waits for ``release`` (set by the test, or at close).
    """

    def __init__(self, jwks: dict[str, Any]) -> None:
        self.jwks = jwks
        self.hits = 0
        self.slow = False
        self.release = asyncio.Event()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/jwks"
        app = web.Application()
        app.router.add_get("/jwks", self._serve)
        self._runner = web.AppRunner(app)
        self._site: web.TCPSite | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.hits += 1
        if self.slow:
            await self.release.wait()
        return web.json_response(self.jwks)

    async def switch_on(self) -> None:
        if self._runner.server is None:
            await self._runner.setup()
        self._site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await self._site.start()

    async def switch_off(self) -> None:
        """Close the listening socket: the next connection is refused."""
        if self._site is not None:
            await self._site.stop()
            self._site = None

    async def close(self) -> None:
        self.release.set()
        await self._runner.cleanup()


@pytest.fixture
async def idp(keys: Keys) -> AsyncIterator[SwitchableJwks]:
    server = SwitchableJwks({"keys": [rsa_jwk(keys.rsa, "rsa-1")]})
    await server.switch_on()
    yield server
    await server.close()


def outage_source(idp: SwitchableJwks, clock: FakeClock, timeout: float = 2.0) -> JwksSource:
    return JwksSource(
        jwks_url=idp.url,
        clock=clock,
        refetch_cooldown_seconds=COOLDOWN,
        retry_seconds=RETRY,
        max_age_seconds=MAX_AGE,
        timeout_seconds=timeout,
    )


async def test_unreachable_provider_is_503_then_recovers_without_a_cooldown(
    idp: SwitchableJwks, keys: Keys, clock: FakeClock
) -> None:
    """Connection refused: 503 for all (one shared attempt); RETRY s after it comes back, 200."""
    source = outage_source(idp, clock)
    verifier = JwtVerifier(settings(), source, clock=clock)
    await idp.switch_off()
    token = sign(claims(clock), keys.rsa)
    results = await asyncio.gather(
        *(verifier.verify(token) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(result, IdentityProviderUnavailable) for result in results)
    assert source.fetches == 1
    await idp.switch_on()
    clock.advance(RETRY)
    assert (await verifier.verify(token)).subject == "alice"
    assert (source.fetches, idp.hits) == (2, 1)


async def test_slow_provider_is_cut_off_by_the_timeout(
    idp: SwitchableJwks, keys: Keys, clock: FakeClock
) -> None:
    """A JWKS answer that never comes is abandoned at timeout_seconds: 503, one shared request."""
    source = outage_source(idp, clock, timeout=0.2)
    verifier = JwtVerifier(settings(), source, clock=clock)
    idp.slow = True
    token = sign(claims(clock), keys.rsa)
    results = await asyncio.gather(
        *(verifier.verify(token) for _ in range(20)), return_exceptions=True
    )
    assert all(isinstance(result, IdentityProviderUnavailable) for result in results)
    assert (source.fetches, idp.hits) == (1, 1)
    idp.slow = False
    clock.advance(RETRY)
    assert (await verifier.verify(token)).subject == "alice"


async def test_a_long_outage_asks_the_provider_once_per_retry_seconds(
    idp: SwitchableJwks, keys: Keys, clock: FakeClock
) -> None:
    """Requests every second through a 60 s outage cause one attempt per RETRY seconds."""
    source = outage_source(idp, clock)
    verifier = JwtVerifier(settings(), source, clock=clock)
    await idp.switch_off()
    for _ in range(60):
        token = sign(claims(clock), keys.rsa)
        with pytest.raises(IdentityProviderUnavailable):
            await verifier.verify(token)
        clock.advance(1)
    assert source.fetches == 60 / RETRY


async def test_outage_keeps_cached_keys_and_makes_unknown_kids_503(
    idp: SwitchableJwks, keys: Keys, clock: FakeClock
) -> None:
    """During an outage cached keys still verify known kids; an unknown kid is 503, not 401."""
    source = outage_source(idp, clock)
    verifier = JwtVerifier(settings(), source, clock=clock)
    assert (await verifier.verify(sign(claims(clock), keys.rsa))).subject == "alice"
    await idp.switch_off()
    clock.advance(MAX_AGE + 1)  # stale, and past the cooldown
    assert (await verifier.verify(sign(claims(clock), keys.rsa))).subject == "alice"
    rotated = sign(claims(clock), keys.rsa_new, kid="rsa-2")
    with pytest.raises(IdentityProviderUnavailable):
        await verifier.verify(rotated)
    assert source.fetches == 2  # the stale refresh failed; the new kid waits for RETRY


@pytest.mark.parametrize(
    "url", ["http://idp.example.com/jwks", "ftp://idp.example.com/jwks", "https:///jwks"]
)
def test_jwks_url_must_be_https(url: str) -> None:
    """A JWKS URL must be https (plain http only to 127.0.0.1 or localhost)."""
    with pytest.raises(ValueError, match="https"):
        JwksSource(jwks_url=url)


def test_jwks_source_needs_exactly_one_origin(tmp_path: Path) -> None:
    """A JWKS source takes a file or a URL, not both and not neither."""
    with pytest.raises(ValueError, match="exactly one"):
        JwksSource()
    with pytest.raises(ValueError, match="exactly one"):
        JwksSource(jwks_file=tmp_path / "j.json", jwks_url="https://idp.example.com/jwks")
    JwksSource(jwks_url="http://localhost:8080/jwks")


# --- subject, groups and claims ---


@pytest.mark.parametrize("subject", ["a/b", "*", "..", "user?", "", "x" * 65, 12345, None])
async def test_unsafe_subject_rejected_without_echo(
    harness: Harness, keys: Keys, subject: object
) -> None:
    """A subject unsafe for a prefix is refused with TemplateValueRejected, never echoed."""
    token = sign(claims(harness.clock, sub=subject), keys.rsa)
    with pytest.raises(TemplateValueRejected) as err:
        await harness.verifier.verify(token)
    assert err.value.context == {"variable": "${subject}"}
    if isinstance(subject, str) and subject:
        assert subject not in err.value.message


async def test_subject_claim_is_configurable(harness: Harness, keys: Keys) -> None:
    """subject_claim picks which claim becomes ${subject}."""
    verifier = JwtVerifier(settings(subject_claim="oid"), harness.source, clock=harness.clock)
    principal = await verifier.verify(sign(claims(harness.clock, oid="u-42"), keys.rsa))
    assert principal.subject == "u-42"


@pytest.mark.parametrize(
    ("groups", "expected"),
    [
        (["editors", "a/b", "*", 5, "..", "ok@x", "editors", "browser"], ("editors", "ok@x")),
        ("editors", ("editors",)),
        ("a/b", ()),
        ({"editors": True}, ()),
        (None, ()),
    ],
)
async def test_groups_claim_filtered(
    harness: Harness, keys: Keys, groups: object, expected: tuple[str, ...]
) -> None:
    """Group values that are not safe strings are dropped; configured groups always come first."""
    token = sign(claims(harness.clock, groups=groups), keys.rsa)
    principal = await harness.verifier.verify(token)
    assert principal.groups == ("browser", *expected)


async def test_groups_claim_ignored_when_not_configured(harness: Harness, keys: Keys) -> None:
    """Without groups_claim only the configured groups apply."""
    verifier = JwtVerifier(settings(groups_claim=None), harness.source, clock=harness.clock)
    principal = await verifier.verify(sign(claims(harness.clock, groups=["admin"]), keys.rsa))
    assert principal.groups == ("browser",)


async def test_claims_keep_only_safe_strings(harness: Harness, keys: Keys) -> None:
    """Only top-level string claims safe as template values reach Principal.claims."""
    token = sign(
        claims(harness.clock, team="t-1", path="a/b", star="*", n=7, nested={"x": "y"}), keys.rsa
    )
    principal = await harness.verifier.verify(token)
    assert principal.claims["team"] == "t-1"
    assert {"path", "star", "n", "nested", "groups"}.isdisjoint(principal.claims)


# --- malformed tokens ---


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        "a.b",
        "a.b.c",
        "....",
        "sk_live_abcdef",
        f"{b64(b'not json')}.{b64(b'{}')}.",
        f"{b64(b'[1, 2]')}.{b64(b'{}')}.",
        f"{b64(json.dumps({'typ': 'JWT'}).encode())}.{b64(b'{}')}.",
        f"{b64(b'[' * 3000)}.{b64(b'{}')}.",
        f"{b64(json.dumps({'alg': 'RS256', 'kid': 7}).encode())}.{b64(b'{}')}.c2ln",
        "eyJhbGciOiJSUzI1NiJ9.%%%.c2ln",
    ],
)
async def test_garbage_tokens_refused(harness: Harness, token: str) -> None:
    """Malformed tokens get a generic AuthenticationFailed."""
    with pytest.raises(AuthenticationFailed) as err:
        await harness.verifier.verify(token)
    assert err.value.message == AuthenticationFailed.fmt
    assert_generic(err, token or "\x00")


async def test_oversized_token_refused(harness: Harness, keys: Keys) -> None:
    """A validly signed token longer than the size limit is refused unparsed."""
    token = sign(claims(harness.clock, padding="x" * MAX_TOKEN_CHARS), keys.rsa)
    assert len(token) > MAX_TOKEN_CHARS
    with pytest.raises(AuthenticationFailed) as err:
        await harness.verifier.verify(token)
    assert err.value.message == AuthenticationFailed.fmt
    assert harness.server.hits == 0


async def test_payload_tampering_refused(harness: Harness, keys: Keys) -> None:
    """Swapping in another payload under a valid signature is refused."""
    header, _, signature = sign(claims(harness.clock), keys.rsa).split(".")
    payload = b64(json.dumps(claims(harness.clock, sub="mallory")).encode())
    with pytest.raises(AuthenticationFailed):
        await harness.verifier.verify(f"{header}.{payload}.{signature}")


def test_looks_like_jwt(keys: Keys, clock: FakeClock) -> None:
    """looks_like_jwt tells JWTs from API keys and garbage."""
    assert looks_like_jwt(sign(claims(clock), keys.rsa))
    assert looks_like_jwt(forge({"alg": "none"}, {}))
    assert not looks_like_jwt("sk_" + secrets.token_urlsafe(32))
    assert not looks_like_jwt("a.b.c")
    assert not looks_like_jwt(forge({"typ": "JWT"}, {}))
    assert not looks_like_jwt(sign(claims(clock, pad="x" * MAX_TOKEN_CHARS), keys.rsa))


def test_jwks_url_with_credentials_is_refused() -> None:
    """A jwks_url carrying user:password@ is refused, so it can never reach a log line."""
    with pytest.raises(ValueError, match="credentials"):
        JwksSource(jwks_url="https://user:secret@idp.example.com/jwks.json")


# --- template injection through a JWT, end to end ---


_TEAM_POLICY = """\
name: team-uploads
description: Per-team uploads, keyed by a JWT claim.
role_arn: acs:ram::1234567890123456:role/oss-service-uploads
bucket: examplebucket
region: cn-hangzhou
prefix: "teams/${claim:team}/"
actions: [put]
duration_seconds: 900
max_url_expires_seconds: 600
callers: ["group:browser"]
"""


@pytest.fixture
async def jwt_broker(make_broker: BrokerFactory, tmp_path: Path, keys: Keys) -> BrokerHarness:
    jwks = write_jwks(tmp_path / "jwks.json", keys.rsa.public_key())
    policies = tmp_path / "policies"
    shutil.copytree(POLICIES_DIR, policies, ignore=shutil.ignore_patterns("*.md"))
    (policies / "team-uploads.yaml").write_text(_TEAM_POLICY)
    jwt_settings = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_file": str(jwks),
        "groups": ["browser"],
        "groups_claim": "groups",
    }
    return await make_broker(policies, auth={"jwt": jwt_settings})


def _jwt_headers(broker: BrokerHarness, key: RSAPrivateKey, **claims: Any) -> dict[str, str]:
    now = broker.clock()
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    payload.update(claims)
    token = jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})
    return {"Authorization": f"Bearer {token}"}


_INJECTIONS = [
    "${subject}",
    "${claim:team}",
    "a/../b",
    "../admin",
    "*",
    "a?",
    "%2F",
    "a%2fb",
    "a\u2215b",
    "a\uff0fb",
    "a\\b",
    "a\nb",
    "a\u0000b",
    "\u202eadmin",
    "x" * 65,
    "",
    ".hidden",
]


@pytest.mark.parametrize("value", _INJECTIONS)
async def test_jwt_subject_injection_is_refused(
    jwt_broker: BrokerHarness, keys: Keys, value: str
) -> None:
    """A JWT sub that could widen avatars/${subject}/ is 403 TemplateValueRejected, before STS."""
    headers = _jwt_headers(jwt_broker, keys.rsa, sub=value)
    status, reply = await send(
        jwt_broker, "GET", "/v1/credentials/avatar-upload", caller=None, headers=headers
    )
    assert (status, error_code(reply)) == (403, "TemplateValueRejected")
    # Only the variable's name is ever echoed, never the value.
    assert reply["error"]["message"] == "the caller's ${subject} cannot be used in a policy prefix"
    assert jwt_broker.sts.emulator.calls == []


@pytest.mark.parametrize("value", [*_INJECTIONS, 7, ["blue"], {"a": "b"}, None])
async def test_jwt_claim_injection_is_refused(
    jwt_broker: BrokerHarness, keys: Keys, value: Any
) -> None:
    """An unsafe or non-string ${claim:team} value is 403 TemplateValueRejected, before STS."""
    headers = _jwt_headers(jwt_broker, keys.rsa, team=value)
    status, reply = await send(
        jwt_broker, "GET", "/v1/credentials/team-uploads", caller=None, headers=headers
    )
    assert (status, error_code(reply)) == (403, "TemplateValueRejected")
    assert jwt_broker.sts.emulator.calls == []


async def test_safe_jwt_claim_renders_its_own_prefix(jwt_broker: BrokerHarness, keys: Keys) -> None:
    """The positive control: a safe team claim gets teams/<team>/."""
    headers = _jwt_headers(jwt_broker, keys.rsa, team="blue")
    status, reply = await send(
        jwt_broker, "GET", "/v1/credentials/team-uploads", caller=None, headers=headers
    )
    assert (status, reply["Oss"]["Prefix"]) == (200, "teams/blue/")
