"""Test helper: an OIDC identity provider (RSA key, JWKS, signed tokens) for AssumeRoleWithOIDC."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey, generate_private_key
from jwt.algorithms import RSAAlgorithm

from broker.dev.emulators.sts_oidc import OidcProvider

__all__ = [
    "CLIENT_ID",
    "ISSUER",
    "PROVIDER_ARN",
    "IdentityProvider",
    "identity_provider",
    "other_key",
]

PROVIDER_ARN = "acs:ram::1234567890123456:oidc-provider/test-idp"
ISSUER = "https://idp.example.test"
CLIENT_ID = "sts-broker-app"


@cache
def _rsa_key(name: str) -> RSAPrivateKey:
    """One RSA key per name for the whole run (key generation is the slow part)."""
    del name
    return generate_private_key(public_exponent=65537, key_size=2048)


@dataclass(frozen=True)
class IdentityProvider:
    """Signs tokens; ``provider()`` registers it with the STS emulator."""

    key: RSAPrivateKey = field(repr=False)
    kid: str = "idp-1"
    issuer: str = ISSUER
    client_id: str = CLIENT_ID

    def jwks(self) -> dict[str, Any]:
        jwk = RSAAlgorithm.to_jwk(self.key.public_key(), as_dict=True)
        return {"keys": [{**jwk, "kid": self.kid, "use": "sig", "alg": "RS256"}]}

    def write_jwks(self, path: Path) -> Path:
        path.write_text(json.dumps(self.jwks()))
        return path

    def provider(self, roles: tuple[str, ...] = ()) -> OidcProvider:
        return OidcProvider(PROVIDER_ARN, self.issuer, (self.client_id,), self.jwks(), roles)

    def token(self, now: float, *, key: RSAPrivateKey | None = None, **claims: Any) -> str:
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": self.client_id,
            "sub": "alice",
            "iat": int(now),
            "exp": int(now) + 600,
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not None}
        signer = self.key if key is None else key
        return jwt.encode(payload, signer, algorithm="RS256", headers={"kid": self.kid})


def identity_provider() -> IdentityProvider:
    """The test identity provider (its key shared across the run)."""
    return IdentityProvider(_rsa_key("idp"))


def other_key() -> RSAPrivateKey:
    """A key the identity provider does not publish."""
    return _rsa_key("intruder")
