"""Request credentials → ``Principal`` (API keys, OIDC/JWT, certificates).  Knows nothing of STS.

Callers send ``Authorization: Bearer <token>``; clients that cannot set
headers (the official SDKs' credentials-URI provider) may send
``?access_token=<token>`` instead.  Neither is ever logged.

API keys are held only as sha256 digests, in a table keyed by digest: a
presented key is hashed once, looked up in O(1) whatever the number of keys,
and the digest found is confirmed with ``hmac.compare_digest``.  The lookup's
timing depends only on the presented key's sha256: at most it tells an
attacker something of digests, from which no key can be recovered.  A key configured
with ``allow`` yields a ``Principal`` carrying that ``Allowance``; the routes
and the use cases refuse what it does not allow.

A caller on the deny list (``auth.revoked``: configured ids, JWT subjects)
is refused exactly as an unknown key is (401 AuthenticationFailed), so a
leaked key learns nothing from being revoked, and revoking a key or removing
it from the file look the same to its holder; the log line ``caller_revoked``
tells operators which it was.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from broker import request_context
from broker.config import ApiKeyAllowSettings, RevokedSettings, Settings, api_key_hashes
from broker.errors import AuthenticationFailed, ConfigError, RequestInvalid
from broker.models import Allowance, Principal
from broker.oidc import MAX_TOKEN_CHARS, JwtVerifier, looks_like_jwt

log = structlog.get_logger("broker.auth")

_CONFIGURED_CALLERS = frozenset({"api_key", "mtls"})
_MAX_SESSION_NAME = 64

__all__ = [
    "ApiKeyAuthenticator",
    "Authenticator",
    "CertificateAuthenticator",
    "Revocations",
    "allowance",
    "api_key_authenticator",
    "certificate_authenticator",
    "certificate_names",
    "extract_token",
    "generate_api_key",
    "hash_api_key",
    "quota_key",
    "revoked_session_names",
    "role_session_name",
]


def hash_api_key(key: str) -> str:
    """The ``key_sha256`` form of an API key."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_api_key() -> str:
    """A new random API key (256 bits, URL-safe)."""
    return "sk_" + secrets.token_urlsafe(32)


def extract_token(authorization: Sequence[str], query: Mapping[str, str]) -> str:
    """The bearer token from the ``Authorization`` header, or from ``access_token`` without one.

    Both at once, either given twice, a scheme other than Bearer, or an
    oversized token are refused.
    """
    from_query = query.get("access_token")
    if _count(query, "access_token") > 1 or len(authorization) > 1:
        raise RequestInvalid("give one Authorization header or one access_token, once")
    if authorization:
        authorization = authorization[0]
        if from_query is not None:
            raise RequestInvalid(
                "give the token in the Authorization header or the query, not both"
            )
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationFailed("the Authorization header must be 'Bearer <token>'")
        return _bounded(token.strip())
    if from_query:
        return _bounded(from_query)
    raise AuthenticationFailed()


def _count(query: Mapping[str, str], name: str) -> int:
    getall = getattr(query, "getall", None)
    if getall is None:
        return 1 if name in query else 0
    return len(getall(name, []))


def _bounded(token: str) -> str:
    if len(token) > MAX_TOKEN_CHARS:
        raise AuthenticationFailed()
    return token


class ApiKeyAuthenticator:
    """Maps an API key to its caller by its sha256 digest: O(1) in the number of keys."""

    def __init__(
        self,
        keys: Mapping[str, str],
        groups: Mapping[str, tuple[str, ...]],
        allow: Mapping[str, Allowance] | None = None,
    ) -> None:
        """``keys`` is ``{caller id: key sha256 hex}``, ``groups`` and ``allow`` by caller id.

        Two callers with one key would make the key's holder ambiguous: refused.
        """
        allow = allow or {}
        self._callers: dict[bytes, tuple[bytes, Principal]] = {}
        owners: dict[bytes, str] = {}
        for caller_id, digest_hex in keys.items():
            digest = bytes.fromhex(digest_hex)
            if digest in owners:
                raise ConfigError(
                    [
                        f"auth.api_keys: {owners[digest]} and {caller_id} have the same key; "
                        "give each caller its own"
                    ]
                )
            owners[digest] = caller_id
            principal = Principal(
                caller_id, tuple(groups.get(caller_id, ())), allow=allow.get(caller_id)
            )
            self._callers[digest] = (digest, principal)

    def __len__(self) -> int:
        return len(self._callers)

    def authenticate(self, token: str) -> Principal | None:
        """The caller whose key is ``token``, or ``None``."""
        presented = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        found = self._callers.get(presented)
        if found is None or not hmac.compare_digest(found[0], presented):
            return None
        return found[1]


def allowance(settings: ApiKeyAllowSettings | None) -> Allowance | None:
    """The ``allow`` section of one API key as its caller carries it (``None``: unrestricted)."""
    if settings is None:
        return None
    routes = None if settings.routes is None else frozenset(settings.routes)
    policies = None if settings.policies is None else frozenset(settings.policies)
    return Allowance(routes=routes, policies=policies)


def api_key_authenticator(
    settings: Settings, environ: Mapping[str, str] | None = None
) -> ApiKeyAuthenticator:
    """The API keys of ``settings.auth``, with their groups and restrictions."""
    keys = settings.auth.api_keys
    return ApiKeyAuthenticator(
        api_key_hashes(settings, environ),
        {key.id: key.groups for key in keys},
        {key.id: limit for key in keys if (limit := allowance(key.allow)) is not None},
    )


class CertificateAuthenticator:
    """A verified client certificate → its configured caller (``auth_method`` mtls).

    The certificate has already been verified by the TLS handshake against
    the configured client CA; only the handshake's result is used, never a
    header that claims to carry a certificate.  Which of its names identify
    it depends on what it carries, most specific first:

    1. its SAN URIs (a SPIFFE ID such as ``spiffe://example.org/ns/prod/sa/app``),
       if it has any, matched exactly against ``auth.mtls[].uri``;
    2. otherwise its SAN DNS names, matched case-insensitively against ``dns``;
    3. only a certificate with neither: its subject common name (exactly one),
       matched against ``common_name``.

    A certificate with a URI SAN is never matched by its DNS names or common
    name, nor one with a DNS SAN by its common name (RFC 6125 §6.4.4's rule for
    CN-IDs): a common name cannot stand in for the identity a SAN states.
    Names of the chosen kind that match two different callers match nobody.
    """

    def __init__(self, callers: Mapping[tuple[str, str], Principal]) -> None:
        """``callers`` maps ``(field, name)`` to a caller; ``certificate_names`` says which."""
        self._callers = dict(callers)

    def authenticate(self, peercert: Mapping[str, Any] | None) -> Principal | None:
        """The caller of a verified peer certificate, or ``None``."""
        if not peercert:
            return None
        field, names = certificate_names(peercert)
        found = {
            caller.subject: caller
            for name in names
            if (caller := self._callers.get((field, name))) is not None
        }
        if len(found) != 1:
            log.info("client_certificate_unmatched", field=field, names=list(names[:4]))
            return None
        return next(iter(found.values()))


def certificate_names(peercert: Mapping[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The kind of name that identifies a certificate (``ssl.getpeercert()``), and its names."""
    sans = peercert.get("subjectAltName", ())
    uris = tuple(value for kind, value in sans if kind == "URI")
    if uris:
        return "uri", uris
    dns_names = tuple(value.lower() for kind, value in sans if kind == "DNS")
    if dns_names:
        return "dns", dns_names
    common_names = tuple(
        value for rdn in peercert.get("subject", ()) for key, value in rdn if key == "commonName"
    )
    return "common_name", common_names if len(common_names) == 1 else ()


def certificate_authenticator(settings: Settings) -> CertificateAuthenticator | None:
    """The mTLS callers of ``settings.auth``, or ``None`` when there are none."""
    if not settings.auth.mtls:
        return None
    return CertificateAuthenticator(
        {
            caller.certificate_name: Principal(caller.id, caller.groups, auth_method="mtls")
            for caller in settings.auth.mtls
        }
    )


@dataclass(frozen=True, slots=True)
class Revocations:
    """Who is refused: configured caller ids (API keys, mTLS) and JWT subjects."""

    callers: frozenset[str] = frozenset()
    subjects: frozenset[str] = frozenset()

    @classmethod
    def from_settings(cls, settings: RevokedSettings) -> Revocations:
        """The deny list of ``auth.revoked``."""
        return cls(frozenset(settings.callers), frozenset(settings.subjects))

    def __or__(self, other: Revocations) -> Revocations:
        return Revocations(self.callers | other.callers, self.subjects | other.subjects)

    def refuses(self, principal: Principal) -> bool:
        """Whether ``principal`` is on the list (ids for configured callers, else subjects)."""
        if principal.auth_method in _CONFIGURED_CALLERS:
            return principal.subject in self.callers
        return principal.subject in self.subjects


def revoked_session_names(revoked: Revocations) -> frozenset[str]:
    """The ``RoleSessionName`` of every revoked caller: what their cache entries are keyed by."""
    configured = (Principal(caller) for caller in revoked.callers)
    users = (Principal(subject, auth_method="jwt") for subject in revoked.subjects)
    return frozenset(role_session_name(principal) for principal in (*configured, *users))


class Authenticator:
    """Bearer token → ``Principal``: a JWT if one is configured and the token is one, else a key.

    ``revoked`` may be replaced while running (a reload, the admin channel);
    a caller on it is refused as an unknown one is.
    """

    def __init__(
        self,
        api_keys: ApiKeyAuthenticator,
        jwt: JwtVerifier | None = None,
        certificates: CertificateAuthenticator | None = None,
        revoked: Revocations | None = None,
    ) -> None:
        self._api_keys = api_keys
        self._jwt = jwt
        self._certificates = certificates
        self.revoked = revoked or Revocations()

    def authenticate_certificate(self, peercert: Mapping[str, Any] | None) -> Principal | None:
        """The caller a verified client certificate maps to, when mTLS callers are configured."""
        if self._certificates is None:
            return None
        return self._admitted(self._certificates.authenticate(peercert))

    async def authenticate(self, token: str) -> Principal:
        """The caller ``token`` belongs to; ``AuthenticationFailed`` otherwise."""
        # API keys never contain dots, so a JWT cannot be mistaken for one.
        if self._jwt is not None and looks_like_jwt(token):
            principal: Principal | None = await self._jwt.verify(token)
        else:
            principal = self._api_keys.authenticate(token)
        principal = self._admitted(principal)
        if principal is None:
            raise AuthenticationFailed()
        return principal

    def _admitted(self, principal: Principal | None) -> Principal | None:
        """``principal`` unless it is revoked (then ``AuthenticationFailed``, logged)."""
        if principal is not None and self.revoked.refuses(principal):
            log.warning(
                "caller_revoked", caller=principal.subject, auth_method=principal.auth_method
            )
            request_context.note_caller(principal)  # the refusal's audit record names who
            raise AuthenticationFailed()
        return principal


def role_session_name(principal: Principal) -> str:
    """STS ``RoleSessionName`` for a caller: 2..64 characters of ``[A-Za-z0-9.@_-]``.

    API-key and mTLS callers appear under their configured id, so ActionTrail
    shows who called.  Other callers (JWT) get a ``u.`` prefix, so a browser
    user whose subject equals a service's id never shares its session name,
    and so never its cached credentials; a name over 64 characters keeps its
    start and ends in a digest.  Subjects have passed the safe-value check.
    """
    subject = principal.subject
    name = subject if principal.auth_method in _CONFIGURED_CALLERS else f"u.{subject}"
    if len(name) > _MAX_SESSION_NAME:
        digest = hashlib.sha256(subject.encode()).hexdigest()[:16]
        name = f"{name[: _MAX_SESSION_NAME - 17]}.{digest}"
    return name if len(name) >= 2 else f"{name}.caller"


def quota_key(principal: Principal) -> str:
    """The rate-limit bucket of a caller: its kind and id, so a JWT subject never shares one."""
    return f"{principal.auth_method}:{principal.subject}"
