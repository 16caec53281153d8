"""Browser apps with OIDC/JWT bearer tokens, end to end through the HTTP API."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import jwt
import pytest
import structlog
from cryptography.hazmat.primitives.asymmetric import rsa

from broker.auth import hash_api_key
from broker.logs import configure_logging
from tests.conftest import BrokerFactory, BrokerHarness, write_jwks
from tests.test_oidc import SwitchableJwks

ISSUER = "https://idp.example.com/"
AUDIENCE = "upload-web"


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
async def broker(
    make_broker: BrokerFactory, tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> BrokerHarness:
    jwks = write_jwks(tmp_path / "jwks.json", signing_key.public_key())
    settings = {
        "issuer": ISSUER,
        "audience": AUDIENCE,
        "jwks_file": str(jwks),
        "groups": ["browser"],
        "groups_claim": "groups",
    }
    return await make_broker(auth={"jwt": settings})


def _jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    jwk: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
    return jwk | {"kid": "k1", "alg": "RS256", "use": "sig"}


def _token(key: rsa.RSAPrivateKey, now: float, **claims: Any) -> str:
    payload = {"iss": ISSUER, "aud": AUDIENCE, "sub": "alice", "iat": now, "exp": now + 300}
    payload.update(claims)
    return jwt.encode(payload, key, algorithm="RS256", headers={"kid": "k1"})


async def test_jwt_caller_gets_its_own_prefix(
    broker: BrokerHarness, signing_key: rsa.RSAPrivateKey
) -> None:
    """A valid browser token gets credentials for avatars/<sub>/, as RoleSessionName u.<sub>."""
    token = _token(signing_key, broker.clock(), sub="bob")
    headers = {"Authorization": f"Bearer {token}"}
    async with broker.client.get("/v1/credentials/avatar-upload", headers=headers) as resp:
        assert resp.status == 200
        assert (await resp.json())["Oss"]["Prefix"] == "avatars/bob/"
    assert broker.sts.emulator.calls[0].params["RoleSessionName"] == "u.bob"


@pytest.mark.parametrize(
    ("claims", "status", "code"),
    [
        ({"aud": "other-app"}, 401, "AuthenticationFailed"),
        ({"iss": "https://idp.example.com"}, 401, "AuthenticationFailed"),
        ({"iss": "https://idp.example.com/evil"}, 401, "AuthenticationFailed"),
        ({"exp": -100}, 401, "AuthenticationFailed"),
        ({"sub": "../admin"}, 403, "TemplateValueRejected"),
        ({"sub": "*"}, 403, "TemplateValueRejected"),
    ],
)
async def test_bad_tokens_are_refused(
    broker: BrokerHarness,
    signing_key: rsa.RSAPrivateKey,
    claims: dict[str, Any],
    status: int,
    code: str,
) -> None:
    """Wrong audience or issuer, expiry and unsafe subjects are refused before STS."""
    now = broker.clock()
    if "exp" in claims:
        claims["exp"] = now + claims["exp"]
    token = _token(signing_key, now, **claims)
    async with broker.client.get(
        "/v1/credentials/avatar-upload", headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        assert resp.status == status
        assert (await resp.json())["error"]["code"] == code
    assert broker.sts.emulator.calls == []


async def test_jwt_subject_cannot_impersonate_an_api_key_caller(
    broker: BrokerHarness, signing_key: rsa.RSAPrivateKey
) -> None:
    """A JWT whose sub equals an API caller id does not get that caller's policies."""
    token = _token(signing_key, broker.clock(), sub="svc-reports", groups=[])
    headers = {"Authorization": f"Bearer {token}"}
    async with broker.client.get("/v1/credentials/reports-read", headers=headers) as resp:
        assert resp.status == 403


async def test_jwt_and_api_keys_both_work(broker: BrokerHarness) -> None:
    """With JWT configured, API keys keep working."""
    status, _ = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert status == 200


async def test_jwt_path_logs_no_token(
    broker: BrokerHarness, signing_key: rsa.RSAPrivateKey
) -> None:
    """Neither a good nor a rejected JWT, nor their signatures, reach the log."""
    stream = io.StringIO()
    configure_logging("json", "debug", stream=stream)
    try:
        good = _token(signing_key, broker.clock(), sub="carol")
        bad = _token(signing_key, broker.clock(), aud="nope", sub="dave")
        for token in (good, bad, good + "x"):
            await broker.client.get(
                f"/v1/credentials/avatar-upload?access_token={token}",
            )
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    text = stream.getvalue()
    assert "credentials_issued" in text
    for token in (good, bad):
        for part in token.split("."):
            assert part not in text


async def test_jwt_subject_equal_to_a_service_id_shares_nothing_with_it(
    make_broker: BrokerFactory, tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> None:
    """A JWT 'svc-reports' gets its own session name, credentials and rate-limit bucket."""
    jwks = write_jwks(tmp_path / "jwks.json", signing_key.public_key())
    settings = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)}
    settings |= {"groups": ["internal"]}  # so both may use reports-read
    broker = await make_broker(
        auth={
            "jwt": settings,
            "api_keys": [{"id": "svc-reports", "key_sha256": hash_api_key("k"), "groups": []}],
        },
        quotas={"caller_requests_per_second": 1, "caller_burst": 1},
    )
    token = _token(signing_key, broker.clock(), sub="svc-reports")
    as_user = {"Authorization": f"Bearer {token}"}
    as_service = {"Authorization": "Bearer k"}
    async with broker.client.get("/v1/credentials/reports-read", headers=as_user) as resp:
        assert resp.status == 200
        user = await resp.json()
    async with broker.client.get("/v1/credentials/reports-read", headers=as_service) as resp:
        assert resp.status == 200  # its own bucket: not throttled by the user's request
        service = await resp.json()
    assert user["AccessKeyId"] != service["AccessKeyId"]
    names = [call.params["RoleSessionName"] for call in broker.sts.emulator.calls]
    assert names == ["u.svc-reports", "svc-reports"]


async def test_identity_provider_outage_is_503_and_over_when_it_is_back(
    make_broker: BrokerFactory, signing_key: rsa.RSAPrivateKey
) -> None:
    """JWKS URL refusing connections: 503 IdentityProviderUnavailable + Retry-After; then 200."""
    idp = SwitchableJwks({"keys": [_jwk(signing_key)]})
    try:
        settings = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_url": idp.url}
        broker = await make_broker(auth={"jwt": settings | {"groups": ["browser"]}})
        headers = {"Authorization": f"Bearer {_token(signing_key, broker.clock())}"}
        async with broker.client.get("/v1/credentials/avatar-upload", headers=headers) as resp:
            assert (resp.status, resp.headers["Retry-After"]) == (503, "5")
            body = await resp.json()
            assert body["error"]["code"] == body["ErrorCode"] == "IdentityProviderUnavailable"
        status, _ = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
        assert status == 200  # API-key callers do not depend on the identity provider
        await idp.switch_on()
        broker.clock.advance(5)  # the retry interval, not a 60 s cooldown
        async with broker.client.get("/v1/credentials/avatar-upload", headers=headers) as resp:
            assert resp.status == 200
        assert [call.params["RoleSessionName"] for call in broker.sts.emulator.calls] == [
            "svc-a",
            "u.alice",
        ]
    finally:
        await idp.close()
