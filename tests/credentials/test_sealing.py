"""Sealed values: AES-256-GCM envelopes bound to their Redis key, and the keys that open them."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from broker.config import RedisSettings
from broker.credentials.sealing import EncryptionKeys, load_encryption_keys, open_sealed, seal
from broker.errors import ConfigError


def new_key() -> str:
    """A fresh AES-256 key, base64-encoded."""
    return base64.b64encode(os.urandom(32)).decode()


def keys_document(active: str, **keys: str) -> str:
    """A keys document (JSON) with ``active`` and ``keys`` (id → base64 key)."""
    return json.dumps({"active": active, "keys": keys})


def test_seal_and_open_round_trip() -> None:
    """A sealed value opens to the same bytes; nonces are fresh; the envelope names the key."""
    keys = EncryptionKeys.parse(keys_document("k1", k1=new_key()), "test")
    first = seal(keys, b"plaintext", b"key-a")
    second = seal(keys, b"plaintext", b"key-a")
    envelope = json.loads(first)
    assert envelope["v"] == 1
    assert envelope["kid"] == "k1"
    assert len(base64.b64decode(envelope["n"])) == 12
    assert first != second
    assert open_sealed(keys, first, b"key-a") == b"plaintext"
    with pytest.raises(ValueError, match="authentication failed"):
        open_sealed(keys, first, b"key-b")


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ("{not json", "is not valid JSON"),
        (keys_document("k2", k1=new_key()), "active: key 'k2' is not in keys"),
        (keys_document("k1", k1="c2hvcnQ="), "keys.k1: must be 32 bytes"),
        (keys_document("k1", k1="!!!"), "keys.k1: is not valid base64"),
        (json.dumps({"active": "k1", "keys": {}}), "keys: "),
    ],
)
def test_bad_key_documents_are_config_errors(document: str, problem: str) -> None:
    """A bad keys document raises ConfigError naming the key and problem, never key material."""
    with pytest.raises(ConfigError) as caught:
        EncryptionKeys.parse(document, "keys.json")
    assert problem in str(caught.value)
    assert "c2hvcnQ=" not in str(caught.value)


def test_rotation_opens_with_any_configured_key() -> None:
    """A value sealed under k1 opens once k2 is active; without k1 it names the unknown key."""
    k1, k2 = new_key(), new_key()
    before = EncryptionKeys.parse(keys_document("k1", k1=k1), "test")
    sealed = seal(before, b"plaintext", b"key-a")
    after = EncryptionKeys.parse(keys_document("k2", k1=k1, k2=k2), "test")
    assert open_sealed(after, sealed, b"key-a") == b"plaintext"
    assert json.loads(seal(after, b"plaintext", b"key-a"))["kid"] == "k2"
    without_k1 = EncryptionKeys.parse(keys_document("k2", k2=k2), "test")
    with pytest.raises(ValueError, match="unknown key id"):
        open_sealed(without_k1, sealed, b"key-a")


@pytest.mark.parametrize(
    ("envelope", "reason"),
    [
        (b"not json", "malformed envelope"),
        (b'{"v": 1, "kid": "k1"}', "malformed envelope"),
        (b'{"v": 2, "kid": "k1", "n": "AAAAAAAAAAAAAAAA", "c": ""}', "unsupported envelope"),
    ],
)
def test_malformed_envelopes_name_the_reason(envelope: bytes, reason: str) -> None:
    """An envelope that cannot even be tried raises ValueError with a reason, never key material."""
    keys = EncryptionKeys.parse(keys_document("k1", k1=new_key()), "test")
    with pytest.raises(ValueError, match=reason):
        open_sealed(keys, envelope, b"key-a")


def test_keys_repr_holds_no_key_material() -> None:
    """The repr of EncryptionKeys names the active key id, not the key bytes."""
    secret = new_key()
    keys = EncryptionKeys.parse(keys_document("k1", k1=secret), "test")
    assert "k1" in repr(keys)
    assert secret not in repr(keys)
    assert repr(base64.b64decode(secret)) not in repr(keys)


def test_keys_file_is_read_relative_to_the_config(tmp_path: Path) -> None:
    """A relative encryption_keys_file is found next to the config file."""
    (tmp_path / "cache-keys.json").write_text(keys_document("k1", k1=new_key()))
    settings = RedisSettings.model_validate({"encryption_keys_file": "cache-keys.json"})
    keys = load_encryption_keys(settings, config_dir=tmp_path, environ={})
    assert keys.active == "k1"


def test_keys_from_the_environment() -> None:
    """encryption_keys_env reads the document from that variable; unset is a ConfigError."""
    settings = RedisSettings.model_validate({"encryption_keys_env": "CACHE_KEYS"})
    document = keys_document("k9", k9=new_key())
    assert load_encryption_keys(settings, environ={"CACHE_KEYS": document}).active == "k9"
    with pytest.raises(ConfigError, match="CACHE_KEYS is not set"):
        load_encryption_keys(settings, environ={})
