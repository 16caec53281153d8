"""Sealed values for the shared cache: AES-256-GCM under named keys, and where the keys come from.

A sealed value is the plaintext encrypted under the active key with a random
96-bit nonce, in the envelope ``{"v": 1, "kid": KEY_ID, "n": NONCE, "c":
CIPHERTEXT}`` (base64).  The caller's associated data (the Redis key) is
authenticated too, so a value copied elsewhere does not open.  Any configured
key opens a value: rotate by adding a key and making it active; drop the old
one once the longest token lifetime has passed.  Key material never appears
in an error, a log line or a repr.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import pydantic
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from pydantic import BeforeValidator, ConfigDict, Field

from broker.config import RedisSettings
from broker.errors import ConfigError

__all__ = ["EncryptionKeys", "load_encryption_keys", "open_sealed", "seal"]

_ENVELOPE_VERSION = 1
_NONCE_BYTES = 12
_KEY_BYTES = 32
_KEY_ID = r"^[A-Za-z0-9._-]{1,64}$"


def _decode_key(value: object) -> bytes:
    if not isinstance(value, str):
        raise ValueError("must be a base64 string")  # never echo key material
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as err:
        raise ValueError("is not valid base64") from err
    if len(raw) != _KEY_BYTES:
        raise ValueError(f"must be {_KEY_BYTES} bytes (AES-256), base64-encoded")
    return raw


class _KeysDocument(pydantic.BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    active: str = Field(pattern=_KEY_ID)
    keys: dict[
        Annotated[str, Field(pattern=_KEY_ID)], Annotated[bytes, BeforeValidator(_decode_key)]
    ] = Field(min_length=1)


@dataclass(frozen=True, slots=True)
class EncryptionKeys:
    """AES-256-GCM keys by id: ``active`` seals new values, any of them opens one."""

    active: str
    keys: Mapping[str, bytes] = field(repr=False)
    _ciphers: Mapping[str, AESGCM] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.active not in self.keys:
            raise ValueError(f"active key {self.active!r} is not among the keys")
        if any(len(key) != _KEY_BYTES for key in self.keys.values()):
            raise ValueError(f"every key must be {_KEY_BYTES} bytes")
        ciphers = {kid: AESGCM(key) for kid, key in self.keys.items()}
        object.__setattr__(self, "_ciphers", ciphers)

    @classmethod
    def parse(cls, text: str, source: str) -> EncryptionKeys:
        """Keys from the JSON ``{"active": ID, "keys": {ID: base64}}``; ``ConfigError`` if bad."""
        try:
            doc = _KeysDocument.model_validate_json(text)
        except pydantic.ValidationError as err:
            raise ConfigError(_key_problems(source, err)) from None  # no key material in errors
        if doc.active not in doc.keys:
            raise ConfigError([f"{source}: active: key {doc.active!r} is not in keys"])
        return cls(doc.active, dict(doc.keys))

    def cipher(self, kid: str) -> AESGCM | None:
        """The cipher of key ``kid``, if configured."""
        return self._ciphers.get(kid)

    def active_cipher(self) -> AESGCM:
        """The cipher of the active key, which seals every new value."""
        return self._ciphers[self.active]


def _key_problems(source: str, err: pydantic.ValidationError) -> list[str]:
    problems = []
    for item in err.errors(include_url=False, include_input=False):
        where = ".".join(str(part) for part in item["loc"]) or "(document)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "json_invalid":
            message = 'is not valid JSON (want {"active": ID, "keys": {ID: base64}})'
        problems.append(f"{source}: {where}: {message}")
    return problems


def load_encryption_keys(
    settings: RedisSettings,
    *,
    config_dir: Path | None = None,
    environ: Mapping[str, str] | None = None,
) -> EncryptionKeys:
    """The keys from ``encryption_keys_file`` (relative to ``config_dir``) or the environment."""
    environ = os.environ if environ is None else environ
    if settings.encryption_keys_env is not None:
        name = settings.encryption_keys_env
        source = f"cache.redis.encryption_keys_env ({name})"
        if not environ.get(name):
            raise ConfigError([f"{source}: environment variable {name} is not set"])
        return EncryptionKeys.parse(environ[name], source)
    path = settings.encryption_keys_file
    if path is None:  # RedisSettings insists on exactly one source
        raise ConfigError(["cache.redis: no encryption keys configured"])
    if not path.is_absolute() and config_dir is not None:
        path = config_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        problem = f"cannot read file ({type(err).__name__})"
        raise ConfigError([f"{path}: {problem}"]) from err
    return EncryptionKeys.parse(text, str(path))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal(keys: EncryptionKeys, plaintext: bytes, associated_data: bytes) -> bytes:
    """``plaintext`` encrypted under the active key with a fresh nonce, as a JSON envelope."""
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = keys.active_cipher().encrypt(nonce, plaintext, associated_data)
    envelope = {"v": _ENVELOPE_VERSION, "kid": keys.active, "n": _b64(nonce), "c": _b64(ciphertext)}
    return json.dumps(envelope, separators=(",", ":")).encode()


def open_sealed(keys: EncryptionKeys, envelope: bytes, associated_data: bytes) -> bytes:
    """The plaintext of ``envelope``; ``ValueError`` naming the reason if it does not open."""
    try:
        doc = json.loads(envelope)
        version, kid, nonce, ciphertext = doc["v"], doc["kid"], doc["n"], doc["c"]
        nonce_bytes = base64.b64decode(nonce, validate=True)
        ciphertext_bytes = base64.b64decode(ciphertext, validate=True)
    except (ValueError, TypeError, KeyError) as err:
        raise ValueError("malformed envelope") from err
    if version != _ENVELOPE_VERSION or len(nonce_bytes) != _NONCE_BYTES:
        raise ValueError("unsupported envelope")
    cipher = keys.cipher(kid) if isinstance(kid, str) else None
    if cipher is None:
        raise ValueError("unknown key id")
    try:
        return cipher.decrypt(nonce_bytes, ciphertext_bytes, associated_data)
    except InvalidTag as err:
        raise ValueError("authentication failed") from err
