"""What one token signs with: the V4 signing key's HMAC states, kept while the token lives.

No secret is a memo key.  ``key_state`` keeps one token's signing state (the
HMAC pads of its signing key, its encoded credential and security token) per
credentials object, day, region and product, until the first signature after
that token expires; at most ``MAX_KEY_STATES`` of them.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from broker.models import Credentials
from broker.signing.encoding import quote as _quote

if TYPE_CHECKING:
    from hashlib import _Hash

__all__ = ["MAX_KEY_STATES", "KeyState", "key_state", "signing_key"]

_IPAD = bytes(b ^ 0x36 for b in range(256))
_OPAD = bytes(b ^ 0x5C for b in range(256))


def signing_key(access_key_secret: str, date: str, region: str, product: str = "oss") -> bytes:
    """The V4 signing key for one secret, day (``YYYYMMDD``), region and product.

    Not memoised here (a memo keyed by secrets would outlive their tokens):
    ``key_state`` keeps what one token signs with, until that token expires.
    """
    key = ("aliyun_v4" + access_key_secret).encode()
    for part in (date, region, product, "aliyun_v4_request"):
        key = hmac.digest(key, part.encode(), "sha256")
    return key


@dataclass(frozen=True, slots=True)
class KeyState:
    """What one token signs with all day in one region: derived once, kept while it lives.

    ``scope`` is ``date/region/product/aliyun_v4_request``; ``credential`` and
    ``token`` are the percent-encoded ``x-oss-credential`` and
    ``x-oss-security-token`` values ("" without a token); ``pads`` the HMAC
    states of the V4 signing key.
    """

    credentials: Credentials
    scope: str
    credential: str
    token: str
    pads: tuple[_Hash, _Hash]


MAX_KEY_STATES = 1024
"""At most this many tokens' signing state is kept (one per access key id, day, region)."""
_KEY_STATES: dict[tuple[str, str, str, str], KeyState] = {}
_NO_EXPIRY = datetime.max.replace(tzinfo=UTC)
_earliest_expiry = [_NO_EXPIRY]  # the soonest expiration among the kept states


def key_state(
    credentials: Credentials, date: str, region: str, product: str, when: datetime
) -> KeyState:
    """The signing state of ``credentials`` for ``date``, ``region`` and ``product``.

    Memoised per (access key id, date, region, product), and only for the very
    credentials object given (``is``): a replaced token, even under the same
    access key id, never signs with another's state.  A state is dropped at
    the first signature (``when``, the signing time: never a cached clock) after
    its token expires, and the memo never holds more than ``MAX_KEY_STATES``.
    """
    if when >= _earliest_expiry[0]:
        _drop_expired(when)
    key = (credentials.access_key_id, date, region, product)
    found = _KEY_STATES.get(key)
    if found is not None and found.credentials is credentials:
        return found
    state = _key_state(credentials, date, region, product)
    if credentials.expiration <= when:
        return state  # already expired: used (the caller decides), never kept
    if found is None and len(_KEY_STATES) >= MAX_KEY_STATES:
        _KEY_STATES.pop(next(iter(_KEY_STATES)))  # the oldest
    _KEY_STATES[key] = state
    _earliest_expiry[0] = min(_earliest_expiry[0], credentials.expiration)
    return state


def _drop_expired(when: datetime) -> None:
    for key in [k for k, state in _KEY_STATES.items() if state.credentials.expiration <= when]:
        del _KEY_STATES[key]
    soonest = (state.credentials.expiration for state in _KEY_STATES.values())
    _earliest_expiry[0] = min(soonest, default=_NO_EXPIRY)


def _key_state(credentials: Credentials, date: str, region: str, product: str) -> KeyState:
    """HMAC-SHA256 inner and outer states of the signing key (RFC 2104), hashed once.

    Copying these per signature is several times cheaper than ``hmac.digest``,
    which re-derives them from the key on every call.
    """
    scope = f"{date}/{region}/{product}/aliyun_v4_request"
    secret = credentials.access_key_secret
    block = signing_key(secret, date, region, product).ljust(64, b"\0")
    pads = hashlib.sha256(block.translate(_IPAD)), hashlib.sha256(block.translate(_OPAD))
    token = credentials.security_token
    return KeyState(
        credentials,
        scope,
        _quote(f"{credentials.access_key_id}/{scope}"),
        _quote(token) if token else "",
        pads,
    )
