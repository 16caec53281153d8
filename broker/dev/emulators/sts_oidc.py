"""The STS emulator's ``AssumeRoleWithOIDC``: an anonymous call whose OIDC token is checked here.

Wire format (the official SDK, alibabacloud_sts20150401 ``client.py``
``assume_role_with_oidcwith_options_async``): ``POST /`` in RPC style with
``auth_type='Anonymous'``, so no AccessKey and no signature; ``Action``,
``Version``, ``Format``, ``Timestamp`` and ``SignatureNonce`` (tea_openapi
``client.py`` ``do_rpcrequest_async``) and ``OIDCProviderArn``, ``OIDCToken``,
``RoleArn``, ``RoleSessionName``, ``DurationSeconds``, ``Policy`` all in the
query string.  The token is checked as the AssumeRoleWithOIDC API reference
describes (alibabacloud.com/help/en/ram/developer-reference/api-sts-2015-04-01-assumerolewithoidc):
signature against the provider's JWKS, ``iss`` equal to the provider's issuer
URL, ``aud`` among its client ids, ``exp`` in the future; the role must trust
the provider.  Error codes (``OIDC_ERRORS``): the token and provider failures
use the codes and 401 status of STS's published error table
(https://help.aliyun.com/zh/ram/developer-reference/api-sts-2015-04-01-errorcodes:
``AuthenticationFail.OIDCToken.Invalid``, ``.Expired``, ``.AudienceNotMatch``,
``.InvalidSignature``, and ``AuthenticationFail.NoPermission`` "No such OIDC
Provider registered."); ``.IssuerNotMatch`` is named by analogy (that table's
excerpt did not show it), and the ``Missing*``/``InvalidParameter`` 400s follow
STS's usual parameter errors.  None of it is verified against a live STS.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import jwt
from jwt.types import Options

from broker.dev.emulators.sts_errors import StsError

__all__ = ["OIDC_ERRORS", "OidcProvider", "VerifiedToken", "verify_oidc_request"]

OIDC_ERRORS: Final[Mapping[str, tuple[int, str]]] = {
    "MissingOIDCProviderArn": (400, "OIDCProviderArn is mandatory for this action."),
    "MissingOIDCToken": (400, "OIDCToken is mandatory for this action."),
    "InvalidParameter.OIDCProviderArn": (400, "The parameter OIDCProviderArn is wrongly formed."),
    "AuthenticationFail.OIDCToken.Invalid": (
        401,
        "The Jwt content is invalid that cannot be recognized.",
    ),
    "AuthenticationFail.OIDCToken.InvalidSignature": (
        401,
        "OIDC token validate failed: invalid signature.",
    ),
    "AuthenticationFail.OIDCToken.Expired": (401, "This JsonWebToken is expired."),
    "AuthenticationFail.OIDCToken.IssuerNotMatch": (401, "Invalid issuer."),
    "AuthenticationFail.OIDCToken.AudienceNotMatch": (401, "Invalid audience."),
    "AuthenticationFail.NoPermission": (401, "There is no permission"),
    "AuthenticationFail.NoPermission.Provider": (401, "No such OIDC Provider registered."),
}

_PROVIDER_ARN = re.compile(r"acs:ram::(?P<account>\d+):oidc-provider/[A-Za-z0-9.\-]{1,128}")
_ALGORITHMS: Final = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256")
_MAX_TOKEN_CHARS: Final = 10_000
# The signature is checked by PyJWT; iss, aud and exp here, each with its own STS code.
_DECODE_OPTIONS: Final[Options] = {
    "verify_signature": True,
    "verify_exp": False,
    "verify_aud": False,
    "verify_iss": False,
    "verify_nbf": False,
    "verify_iat": False,
}


@dataclass(frozen=True)
class OidcProvider:
    """An OIDC identity provider registered in RAM, and the roles whose trust policy names it.

    ``roles`` empty means every role trusts it.
    """

    arn: str
    issuer: str
    client_ids: tuple[str, ...]
    jwks: Mapping[str, Any] = field(repr=False)
    roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifiedToken:
    """What STS learned from a good token (``OIDCTokenInfo`` in the reply)."""

    subject: str
    issuer: str
    client_ids: tuple[str, ...]
    issued_at: int | None
    expires_at: int


def verify_oidc_request(
    params: Mapping[str, str],
    providers: Mapping[str, OidcProvider],
    account_id: str,
    now: float,
) -> VerifiedToken:
    """Check ``OIDCProviderArn`` and ``OIDCToken`` (and the role's trust), or raise ``StsError``."""
    arn, token = params.get("OIDCProviderArn"), params.get("OIDCToken")
    if not arn:
        raise _error("MissingOIDCProviderArn")
    if not token:
        raise _error("MissingOIDCToken")
    match = _PROVIDER_ARN.fullmatch(arn)
    if match is None:
        raise _error("InvalidParameter.OIDCProviderArn")
    provider = providers.get(arn)
    if provider is None or match["account"] != account_id:
        raise _error("AuthenticationFail.NoPermission.Provider")
    verified = _verify_token(token, provider, now)
    role = params.get("RoleArn", "")
    if provider.roles and role not in provider.roles:
        raise _error("AuthenticationFail.NoPermission")
    return verified


def _error(code: str) -> StsError:
    status, message = OIDC_ERRORS[code]
    err = StsError("InternalError", message)
    # Two messages share one published code: the ``.Provider`` entry is its "no such provider".
    err.status, err.code = status, code.removesuffix(".Provider")
    return err


def _verify_token(token: str, provider: OidcProvider, now: float) -> VerifiedToken:
    claims = _decode(token, provider)
    if claims.get("iss") != provider.issuer:
        raise _error("AuthenticationFail.OIDCToken.IssuerNotMatch")
    audiences = claims.get("aud")
    audience_list = [audiences] if isinstance(audiences, str) else audiences
    if not isinstance(audience_list, list) or not any(
        aud in provider.client_ids for aud in audience_list
    ):
        raise _error("AuthenticationFail.OIDCToken.AudienceNotMatch")
    expires, subject = claims.get("exp"), claims.get("sub")
    if not isinstance(expires, int | float) or not isinstance(subject, str) or not subject:
        raise _error("AuthenticationFail.OIDCToken.Invalid")
    if now >= expires:
        raise _error("AuthenticationFail.OIDCToken.Expired")
    issued = claims.get("iat")
    return VerifiedToken(
        subject=subject,
        issuer=provider.issuer,
        client_ids=tuple(str(aud) for aud in audience_list),
        issued_at=int(issued) if isinstance(issued, int | float) else None,
        expires_at=int(expires),
    )


def _decode(token: str, provider: OidcProvider) -> dict[str, Any]:
    """The token's claims if its signature is one of the provider's keys; times checked later."""
    if len(token) > _MAX_TOKEN_CHARS:
        raise _error("AuthenticationFail.OIDCToken.Invalid")
    try:
        header = jwt.get_unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in _ALGORITHMS:
            raise _error("AuthenticationFail.OIDCToken.Invalid")
        keys = [k for k in jwt.PyJWKSet.from_dict(dict(provider.jwks)).keys if k.key_id == kid]
        if len(keys) != 1:
            raise _error("AuthenticationFail.OIDCToken.Invalid")
        claims: dict[str, Any] = jwt.decode(
            token, keys[0], algorithms=[alg], options=_DECODE_OPTIONS
        )
    except jwt.InvalidSignatureError:
        raise _error("AuthenticationFail.OIDCToken.InvalidSignature") from None
    except jwt.PyJWTError:
        raise _error("AuthenticationFail.OIDCToken.Invalid") from None
    return claims
