"""The ``auth`` section of the configuration: API keys, JWT, mTLS callers, the deny list."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictStr,
    field_validator,
    model_validator,
)

from broker.names import CALLER_ID_PATTERN, POLICY_NAME_PATTERN, is_caller_id

__all__ = [
    "HEX_SHA256",
    "ApiKeyAllowSettings",
    "ApiKeySettings",
    "ApiRoute",
    "AuthSettings",
    "Identifier",
    "JwtSettings",
    "MtlsCallerSettings",
    "RevokedSettings",
]

HEX_SHA256 = re.compile(r"^[0-9a-f]{64}$")
"""An API key's sha256 as the file (or its ``key_sha256_env`` variable) must give it."""

_DNS_NAME = (
    r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


def _no_double_dot(value: str) -> str:
    if not is_caller_id(value):  # after the pattern, only ".." is left to refuse
        raise ValueError("may not contain '..'")
    return value


# A caller or group id becomes ${subject}/${group}, so it must be renderable.
Identifier = Annotated[
    StrictStr, Field(pattern=f"^{CALLER_ID_PATTERN}$"), AfterValidator(_no_double_dot)
]


class _Section(BaseModel):  # as broker.config's sections: unknown keys refused, frozen
    model_config = ConfigDict(extra="forbid", frozen=True)


ApiRoute = Literal["credentials", "presign", "post_policy", "policies"]
"""The routes an API key can be restricted to, by their names in ``broker.http.app``."""

_PolicyName = Annotated[StrictStr, Field(pattern=f"^{POLICY_NAME_PATTERN}$")]


def _unique_entries(values: tuple[str, ...] | None) -> tuple[str, ...] | None:
    if values is not None:
        if not values:
            raise ValueError("list at least one entry, or leave the key out (no restriction)")
        for index, value in enumerate(values):
            if value in values[:index]:
                raise ValueError(f"{value!r} is listed twice")
    return values


def _unique_list(values: tuple[str, ...]) -> tuple[str, ...]:
    for index, value in enumerate(values):
        if value in values[:index]:
            raise ValueError(f"{value!r} is listed twice")
    return values


class ApiKeyAllowSettings(_Section):
    """A restricted key: only these routes, only these policies (either left out: no limit).

    Meant for keys that sit in a URL (``ALIBABA_CLOUD_CREDENTIALS_URI``):
    ``{routes: [credentials], policies: [service-uploads]}`` lets a leaked key
    fetch only the scoped token it was made for.  Anything else is 403 AccessDenied.
    """

    routes: Annotated[tuple[ApiRoute, ...] | None, AfterValidator(_unique_entries)] = None
    policies: Annotated[tuple[_PolicyName, ...] | None, AfterValidator(_unique_entries)] = None

    @model_validator(mode="after")
    def _restricts_something(self) -> ApiKeyAllowSettings:
        if self.routes is None and self.policies is None:
            raise ValueError("give routes and/or policies (or leave allow out: no restriction)")
        return self


class ApiKeySettings(_Section):
    """One internal caller: its id (``${subject}``), the sha256 of its key, its groups.

    ``allow`` restricts what the key may reach (unset: every route, every
    policy whose ``callers`` name it).
    """

    id: Identifier
    key_sha256: str | None = None
    key_sha256_env: str | None = Field(default=None, pattern=r"^[A-Z_][A-Z0-9_]*$")
    groups: tuple[Identifier, ...] = ()
    allow: ApiKeyAllowSettings | None = None

    @field_validator("key_sha256")
    @classmethod
    def _check_hash(cls, value: str | None) -> str | None:
        if value is not None and not HEX_SHA256.match(value):
            raise ValueError(
                "must be 64 lower-case hex characters (make one with `sts-broker hash-key`)"
            )
        return value

    @model_validator(mode="after")
    def _one_source(self) -> ApiKeySettings:
        if (self.key_sha256 is None) == (self.key_sha256_env is None):
            raise ValueError("give exactly one of key_sha256 or key_sha256_env")
        return self


class JwtSettings(_Section):
    """OIDC/JWT bearer tokens for browser apps."""

    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    jwks_file: Path | None = None
    jwks_url: str | None = None
    subject_claim: str = "sub"
    groups: tuple[Identifier, ...] = ()
    groups_claim: str | None = None
    algorithms: tuple[str, ...] = ("RS256", "ES256")

    @field_validator("jwks_url")
    @classmethod
    def _no_userinfo(cls, value: str | None) -> str | None:
        if value is not None and "@" in urlsplit(value).netloc:
            raise ValueError("may not carry credentials (user:password@)")
        return value

    @model_validator(mode="after")
    def _one_jwks(self) -> JwtSettings:
        if (self.jwks_file is None) == (self.jwks_url is None):
            raise ValueError("give exactly one of jwks_file or jwks_url")
        return self


class MtlsCallerSettings(_Section):
    """A caller identified by one name of its verified client certificate.

    Exactly one of ``uri`` (a SAN URI such as a SPIFFE ID), ``dns`` (a SAN DNS
    name) or ``common_name``; which one a certificate is matched by is the rule
    of ``broker.auth.CertificateAuthenticator``.
    """

    id: Identifier
    uri: str | None = Field(default=None, max_length=2048, pattern=r"^[A-Za-z][A-Za-z0-9+.-]*:\S+$")
    dns: str | None = Field(default=None, max_length=253, pattern=_DNS_NAME)
    common_name: str | None = Field(default=None, min_length=1, max_length=64)
    groups: tuple[Identifier, ...] = ()

    @model_validator(mode="after")
    def _one_name(self) -> MtlsCallerSettings:
        if [self.uri, self.dns, self.common_name].count(None) != 2:
            raise ValueError("give exactly one of uri, dns or common_name")
        return self

    @property
    def certificate_name(self) -> tuple[str, str]:
        """``(field, name)`` identifying this caller; DNS names in lower case."""
        if self.uri is not None:
            return "uri", self.uri
        if self.dns is not None:
            return "dns", self.dns.lower()
        return "common_name", self.common_name or ""


_Subject = Annotated[StrictStr, Field(min_length=1, max_length=1024)]


class RevokedSettings(_Section):
    """The deny list: refused at once (401, as an unknown key), their cached credentials purged.

    ``callers`` are configured ids (API keys and mTLS callers), ``subjects``
    are JWT subjects.  Reloaded with the policies (SIGHUP, watch).
    """

    callers: Annotated[tuple[Identifier, ...], AfterValidator(_unique_list)] = ()
    subjects: Annotated[tuple[_Subject, ...], AfterValidator(_unique_list)] = ()


class AuthSettings(_Section):
    """Who may call the broker, and who may not any more (``revoked``)."""

    api_keys: tuple[ApiKeySettings, ...] = ()
    jwt: JwtSettings | None = None
    mtls: tuple[MtlsCallerSettings, ...] = ()
    revoked: RevokedSettings = RevokedSettings()

    @field_validator("api_keys")
    @classmethod
    def _unique_ids(cls, value: tuple[ApiKeySettings, ...]) -> tuple[ApiKeySettings, ...]:
        seen: set[str] = set()
        for key in value:
            if key.id in seen:
                raise ValueError(f"api key id {key.id!r} is listed twice")
            seen.add(key.id)
        return value

    @field_validator("mtls")
    @classmethod
    def _unique_names(cls, value: tuple[MtlsCallerSettings, ...]) -> tuple[MtlsCallerSettings, ...]:
        names = [caller.certificate_name for caller in value]
        for name in {name for name in names if names.count(name) > 1}:
            raise ValueError(f"{name[0]} {name[1]!r} identifies more than one caller")
        return value
