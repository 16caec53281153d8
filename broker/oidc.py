"""OIDC/JWT bearer tokens for browser apps → ``Principal``: a cached JWKS and a strict verifier.

Signatures are checked by PyJWT; this module decides which key and which
algorithm may be used, and checks the claims against the injected clock:

* only asymmetric algorithms from an explicit allowlist; ``none`` and every
  HMAC (``HS*``) algorithm are refused outright, so a token "signed" with the
  public key as an HMAC secret can never verify;
* the JWK must fit the algorithm (key type, curve, and its ``alg`` if given);
* ``iss`` must equal the configured issuer exactly, ``aud`` must be present
  and contain the audience, ``exp`` must be present; ``nbf`` and ``iat`` are
  honoured; all with a small leeway;
* an unknown ``kid`` refetches a URL-served JWKS at most once per cooldown,
  and concurrent refetches share one request, so a flood of made-up kids
  cannot be turned against the identity provider;
* an identity provider that cannot be reached (or is too slow) is the
  broker's problem, not the caller's: 503 ``IdentityProviderUnavailable``
  with ``Retry-After``, and a new attempt a few seconds later, not a
  cooldown later.

No error message or log line carries the token, a claim's value or a key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import jwt
import structlog
from jwt.types import Options

from broker.config import JwtSettings
from broker.errors import AuthenticationFailed, IdentityProviderUnavailable, TemplateValueRejected
from broker.models import Clock, OidcToken, Principal, system_clock
from broker.templates import CLAIM_NAME_PATTERN, check_template_value

__all__ = ["MAX_TOKEN_CHARS", "JwksSource", "JwtVerifier", "looks_like_jwt"]

log = structlog.get_logger("broker.oidc")

MAX_TOKEN_CHARS = 8192
"""Longer bearer tokens are refused before any parsing."""

_MAX_JWKS_BYTES = 256 * 1024
_LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_PRIVATE_MEMBERS = frozenset({"d", "p", "q", "dp", "dq", "qi", "oth", "k"})
_TOKEN_SHAPE = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*\Z")
_CLAIM_NAME = re.compile(rf"{CLAIM_NAME_PATTERN}\Z")  # as in ${claim:NAME}


@dataclass(frozen=True, slots=True)
class _KeyShape:
    """The JWK an algorithm needs: its ``kty`` and, for curves, which ones."""

    kty: str
    curves: frozenset[str] = frozenset()


_RSA = _KeyShape("RSA")
_KEY_SHAPES: Mapping[str, _KeyShape] = MappingProxyType(
    {
        **dict.fromkeys(("RS256", "RS384", "RS512", "PS256", "PS384", "PS512"), _RSA),
        "ES256": _KeyShape("EC", frozenset({"P-256"})),
        "ES384": _KeyShape("EC", frozenset({"P-384"})),
        "ES512": _KeyShape("EC", frozenset({"P-521"})),
        "EdDSA": _KeyShape("OKP", frozenset({"Ed25519", "Ed448"})),
    }
)
"""Every algorithm that may ever be allowed.  No HMAC, no ``none``."""

# exp/nbf/iat are checked here against the injected clock; the signature,
# iss and aud by PyJWT.  verify_signature is never turned off.
_DECODE_OPTIONS: Options = {
    "verify_signature": True,
    "require": ["exp", "iss", "aud"],
    "verify_aud": True,
    "verify_iss": True,
    "verify_exp": False,
    "verify_nbf": False,
    "verify_iat": False,
    "verify_sub": False,
    "enforce_minimum_key_length": True,
}


# --- token shape ---


def _unverified_header(token: str) -> dict[str, Any] | None:
    """The token's header if it is a bounded, well-formed compact JWS with an ``alg``."""
    if len(token) > MAX_TOKEN_CHARS or not _TOKEN_SHAPE.match(token):
        return None
    segment = token.partition(".")[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (ValueError, RecursionError):
        return None
    if not isinstance(header, dict) or not isinstance(header.get("alg"), str):
        return None
    return header


def looks_like_jwt(token: str) -> bool:
    """Whether ``token`` is shaped like a JWT: three base64url segments, a JSON header with alg."""
    return _unverified_header(token) is not None


# --- JWKS ---


@dataclass(frozen=True, slots=True)
class _Jwk:
    """One usable public key from a JWKS document."""

    kty: str
    kid: str | None
    crv: str | None
    alg: str | None
    data: Mapping[str, Any] = field(repr=False)

    def fits(self, kid: str | None, alg: str) -> bool:
        """Whether this key may verify a token with this ``kid`` and ``alg``."""
        shape = _KEY_SHAPES.get(alg)
        return (
            shape is not None
            and (kid is None or self.kid == kid)
            and self.kty == shape.kty
            and (not shape.curves or self.crv in shape.curves)
            and self.alg in (None, alg)
        )


def _optional_str(member: object) -> str | None:
    return member if isinstance(member, str) else None


def _jwk_from(entry: object) -> _Jwk | None:
    """A public signing key, or ``None`` for anything else (private, HMAC, encryption)."""
    if not isinstance(entry, dict) or _PRIVATE_MEMBERS & entry.keys():
        return None
    kty = entry.get("kty")
    if not any(kty == shape.kty for shape in _KEY_SHAPES.values()):
        return None
    if entry.get("use", "sig") != "sig":
        return None
    return _Jwk(
        kty=str(kty),
        kid=_optional_str(entry.get("kid")),
        crv=_optional_str(entry.get("crv")),
        alg=_optional_str(entry.get("alg")),
        data=MappingProxyType(dict(entry)),
    )


def _parse_jwks(raw: bytes) -> tuple[_Jwk, ...]:
    """The usable keys of a JWKS document; ``ValueError`` if it has none."""
    if len(raw) > _MAX_JWKS_BYTES:
        raise ValueError("JWKS document is too large")
    document = json.loads(raw)
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise ValueError("JWKS document has no 'keys' list")
    keys = tuple(jwk for jwk in map(_jwk_from, entries) if jwk is not None)
    if not keys:
        raise ValueError("JWKS document has no usable public signing key")
    return keys


def _check_jwks_url(url: str) -> str:
    """``url`` if it is https, or http to this host (for tests); ``ValueError`` otherwise."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise ValueError("jwks_url may not carry credentials (user:password@)")
    if parts.scheme == "https" and parts.hostname:
        return url
    if parts.scheme == "http" and parts.hostname in _LOCAL_HOSTS:
        return url
    raise ValueError("jwks_url must be an https:// URL (http only for 127.0.0.1 or localhost)")


async def _read_bounded(response: aiohttp.ClientResponse) -> bytes:
    body = bytearray()
    async for chunk in response.content.iter_any():
        body += chunk
        if len(body) > _MAX_JWKS_BYTES:
            raise ValueError("JWKS document is too large")
    return bytes(body)


class JwksSource:
    """The identity provider's public keys, from a file or an https URL, cached.

    Keys are loaded on first use and again after ``max_age_seconds``.  A
    ``kid`` that is not in the cached set triggers a reload at most once per
    ``refetch_cooldown_seconds`` after a successful load, so a flood of
    made-up kids cannot be turned against the identity provider.  After a
    FAILED load (unreachable, an error status, a bad document, or slower than
    ``timeout_seconds``) the next attempt is allowed after only
    ``retry_seconds``: callers are not locked out for a whole cooldown once
    the provider is back, and a provider that is down is asked at most once
    per ``retry_seconds``.  Concurrent callers share one load.  A failed load
    keeps the previous keys; with no key to check a token against because the
    provider failed, the caller gets ``IdentityProviderUnavailable`` (503 with
    ``Retry-After``), never a 401.  ``fetches`` counts load attempts.
    """

    def __init__(
        self,
        *,
        jwks_file: Path | None = None,
        jwks_url: str | None = None,
        clock: Clock = system_clock,
        refetch_cooldown_seconds: float = 60.0,
        retry_seconds: float = 5.0,
        max_age_seconds: float = 3600.0,
        timeout_seconds: float = 5.0,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
    ) -> None:
        if (jwks_file is None) == (jwks_url is None):
            raise ValueError("give exactly one of jwks_file or jwks_url")
        self._file = jwks_file
        self._url = None if jwks_url is None else _check_jwks_url(jwks_url)
        self._clock = clock
        self._cooldown = refetch_cooldown_seconds
        self._retry = retry_seconds
        self._max_age = max_age_seconds
        self._timeout_seconds = timeout_seconds
        self._timeout = aiohttp.ClientTimeout(total=timeout_seconds)
        self._session_factory = session_factory
        self._keys: tuple[_Jwk, ...] = ()
        self._prepared: dict[tuple[int, str], jwt.PyJWK | None] = {}
        self._loaded_at: float | None = None
        self._attempted_at: float | None = None
        self._failing = False  # whether the last load attempt failed
        self._lock = asyncio.Lock()
        self.fetches = 0

    async def key_for(self, kid: str | None, alg: str) -> jwt.PyJWK:
        """The key for a token's ``kid`` and ``alg``.

        ``AuthenticationFailed`` if no key fits; ``IdentityProviderUnavailable``
        if none fits because the keys could not be loaded.  A token without
        ``kid`` is accepted only when exactly one key fits ``alg``.
        """
        if self._is_stale():
            await self._refresh(self._is_stale)
        key = self._find(kid, alg)
        if key is None and await self._refresh(self._may_load):
            key = self._find(kid, alg)
        if key is not None:
            return key
        if self._failing:
            raise IdentityProviderUnavailable(retry_after=self._retry_after(), reason="jwks")
        raise AuthenticationFailed(reason="no_matching_key")

    def _next_attempt_at(self) -> float:
        """When a load may be tried again: soon after a failure, a cooldown after a success."""
        if self._attempted_at is None:
            return -math.inf
        return self._attempted_at + (self._retry if self._failing else self._cooldown)

    def _may_load(self) -> bool:
        return self._clock() >= self._next_attempt_at()

    def _is_stale(self) -> bool:
        loaded = self._loaded_at
        return self._may_load() and (loaded is None or self._clock() - loaded >= self._max_age)

    def _retry_after(self) -> int:
        return max(1, math.ceil(self._next_attempt_at() - self._clock()))

    async def _refresh(self, wanted: Callable[[], bool]) -> bool:
        """Load once if ``wanted()``; True if the keys may have changed since the call began.

        A caller arriving while a load is in flight waits for it and uses its result.
        """
        seen = self.fetches
        async with self._lock:
            if self.fetches != seen:
                return True  # another caller loaded while this one waited
            if not wanted():
                return False
            await self._load()
            return True

    async def _load(self) -> None:
        self._attempted_at = self._clock()
        self._failing = True  # until it succeeds: an interrupted load is retried soon, too
        try:
            async with asyncio.timeout(self._timeout_seconds):  # the whole load, file or URL
                keys = _parse_jwks(await self._read())
        except (OSError, aiohttp.ClientError, TimeoutError, ValueError, RecursionError) as err:
            log.warning("jwks_load_failed", source=self._source_name(), error=type(err).__name__)
        else:
            self._failing = False
            self._install(keys)
        finally:
            self.fetches += 1  # counted once finished, so waiters see that a load happened

    def _install(self, keys: tuple[_Jwk, ...]) -> None:
        self._keys, self._prepared, self._loaded_at = keys, {}, self._attempted_at
        log.info("jwks_loaded", source=self._source_name(), keys=len(keys))

    async def _read(self) -> bytes:
        if self._url is None:
            assert self._file is not None
            return await asyncio.to_thread(self._file.read_bytes)
        return await self._get(self._url)

    async def _get(self, url: str) -> bytes:
        # No redirects: a redirect could lead off https.
        async with (
            self._new_session() as session,
            session.get(url, timeout=self._timeout, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise ValueError(f"JWKS endpoint answered HTTP {response.status}")
            return await _read_bounded(response)

    def _new_session(self) -> aiohttp.ClientSession:
        if self._session_factory is not None:
            return self._session_factory()
        return aiohttp.ClientSession(timeout=self._timeout)

    def _source_name(self) -> str:
        if self._url is not None:
            parts = urlsplit(self._url)
            return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
        return str(self._file)

    def _find(self, kid: str | None, alg: str) -> jwt.PyJWK | None:
        fits = [index for index, jwk in enumerate(self._keys) if jwk.fits(kid, alg)]
        if not fits or (kid is None and len(fits) > 1):
            return None
        return self._prepare(fits[0], alg)

    def _prepare(self, index: int, alg: str) -> jwt.PyJWK | None:
        """The JWK bound to ``alg`` (PyJWT then refuses any other alg with it)."""
        if (index, alg) not in self._prepared:
            try:
                key: jwt.PyJWK | None = jwt.PyJWK(dict(self._keys[index].data), algorithm=alg)
            except jwt.PyJWTError:
                key = None
            self._prepared[index, alg] = key
        return self._prepared[index, alg]


# --- verification ---


def _allowed_algorithms(algorithms: tuple[str, ...]) -> tuple[str, ...]:
    """The allowlist, or ``ValueError`` if it is empty or names ``none``, HMAC or an unknown alg."""
    if not algorithms:
        raise ValueError("auth.jwt.algorithms must name at least one algorithm")
    for alg in algorithms:
        if alg.upper().startswith("HS") or alg.lower() == "none":
            raise ValueError(f"auth.jwt.algorithms: {alg!r} is never accepted (only asymmetric)")
        if alg not in _KEY_SHAPES:
            raise ValueError(
                f"auth.jwt.algorithms: {alg!r} is not supported; use {', '.join(_KEY_SHAPES)}"
            )
    return algorithms


def _time_claim(claims: Mapping[str, Any], name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise AuthenticationFailed(reason=f"invalid_{name}")
    return float(value)


def _safe_value(value: object) -> str | None:
    """``value`` if it is a string that may stand in for a template variable."""
    if not isinstance(value, str):
        return None
    try:
        return check_template_value(value)
    except ValueError:
        return None


def _subject(claims: Mapping[str, Any], settings: JwtSettings) -> str:
    subject = _safe_value(claims.get(settings.subject_claim))
    if subject is None:
        raise TemplateValueRejected(variable="${subject}")
    return subject


def _groups(claims: Mapping[str, Any], settings: JwtSettings) -> tuple[str, ...]:
    """Configured groups, then the safe values of the groups claim (others dropped)."""
    raw = claims.get(settings.groups_claim) if settings.groups_claim else None
    values = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
    extra = (group for group in map(_safe_value, values) if group is not None)
    return tuple(dict.fromkeys((*settings.groups, *extra)))


def _template_claims(claims: Mapping[str, Any]) -> Mapping[str, str]:
    """Top-level string claims usable as ``${claim:NAME}``; every other claim is left out."""
    safe = {name: _safe_value(value) for name, value in claims.items() if _CLAIM_NAME.match(name)}
    return MappingProxyType({name: value for name, value in safe.items() if value is not None})


class JwtVerifier:
    """A browser app's bearer token → ``Principal`` (``auth_method="jwt"``)."""

    def __init__(
        self,
        settings: JwtSettings,
        jwks: JwksSource,
        *,
        clock: Clock = system_clock,
        leeway_seconds: float = 30.0,
    ) -> None:
        if leeway_seconds < 0:
            raise ValueError("leeway_seconds must not be negative")
        self._algorithms = _allowed_algorithms(tuple(settings.algorithms))
        self._settings = settings
        self._jwks = jwks
        self._clock = clock
        self._leeway = leeway_seconds

    async def verify(self, token: str) -> Principal:
        """The caller ``token`` proves; ``AuthenticationFailed`` or ``TemplateValueRejected``."""
        alg, kid = self._algorithm_and_kid(token)
        key = await self._jwks.key_for(kid, alg)
        claims = self._decode(token, key, alg)
        self._check_times(claims)
        return Principal(
            subject=_subject(claims, self._settings),
            groups=_groups(claims, self._settings),
            auth_method="jwt",
            claims=_template_claims(claims),
            oidc_token=OidcToken(token, str(claims["iss"]), float(claims["exp"])),
        )

    def _algorithm_and_kid(self, token: str) -> tuple[str, str | None]:
        header = _unverified_header(token)
        if header is None:
            raise AuthenticationFailed(reason="malformed_token")
        alg, kid = header["alg"], header.get("kid")
        if alg not in self._algorithms:
            raise AuthenticationFailed(reason="algorithm_not_allowed")
        if kid is not None and not isinstance(kid, str):
            raise AuthenticationFailed(reason="malformed_token")
        return alg, kid

    def _decode(self, token: str, key: jwt.PyJWK, alg: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token,
                key,
                algorithms=[alg],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                options=_DECODE_OPTIONS,
            )
        except jwt.PyJWTError as err:
            # ``from None``: PyJWT's message stays out of logs and replies.
            raise AuthenticationFailed(reason=type(err).__name__) from None

    def _check_times(self, claims: Mapping[str, Any]) -> None:
        now, leeway = self._clock(), self._leeway
        expires = _time_claim(claims, "exp")
        if expires is None or now >= expires + leeway:
            raise AuthenticationFailed(reason="expired")
        for name in ("nbf", "iat"):
            moment = _time_claim(claims, name)
            if moment is not None and now + leeway < moment:
                raise AuthenticationFailed(reason=f"{name}_in_future")
