"""``CacheKey`` (broker/credentials/cache.py): hashed once, compared by its seven fields.

The key is hashed at construction and its ``parts()`` feed the shared
store's Redis key: that digest must stay what it was when it was computed
from ``dataclasses.astuple`` of the seven fields, or a rolling upgrade would
miss every value the fleet already holds.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from broker.credentials.cache import CacheKey
from broker.credentials.redis import SharedRedis
from broker.credentials.shared_store import SharedCredentialStore
from broker.metrics import Metrics
from broker.models import AssumeRoleRequest
from tests.conftest import FakeClock
from tests.credentials.test_shared_store import _KEYS, PREFIX, ROLE

POLICY = '{"Version":"1","Statement":[{"Effect":"Allow","Action":["oss:GetObject"]}]}'


def _request(**changes: object) -> AssumeRoleRequest:
    request = AssumeRoleRequest(
        role_arn=ROLE,
        policy=POLICY,
        duration_seconds=3600,
        role_session_name="svc-a",
    )
    return dataclasses.replace(request, **changes)


VARIANTS = [
    _request(),
    _request(external_id="ext-1"),
    _request(effective_lifetime_seconds=900),
    _request(federation="oidc acs:ram::1:oidc-provider/idp https://idp.example.com/ bob"),
    _request(
        role_arn="acs:ram::1234567890123456:role/other",
        policy=POLICY.replace("Get", "Put"),
        duration_seconds=900,
        role_session_name="u.bob",
        external_id="ext-2",
        effective_lifetime_seconds=60,
        federation="oidc x y z",
    ),
]


@dataclasses.dataclass(frozen=True)
class _PreviousCacheKey:
    """The key as it was before issue 14: a plain dataclass of the same seven fields."""

    role_arn: str
    policy_digest: str
    duration_seconds: int
    external_id: str | None
    role_session_name: str
    effective_lifetime_seconds: int | None = None
    federation: str | None = None


def _previous_digest(request: AssumeRoleRequest) -> str:
    """The shared store's slot digest computed the old way: json of astuple of the key."""
    key = _PreviousCacheKey(
        request.role_arn,
        hashlib.sha256(request.policy.encode()).hexdigest(),
        request.duration_seconds,
        request.external_id,
        request.role_session_name,
        request.effective_lifetime_seconds,
        request.federation,
    )
    fields = dataclasses.astuple(key)
    return hashlib.sha256(json.dumps(fields, separators=(",", ":")).encode()).hexdigest()


def test_equal_keys_hash_equal() -> None:
    """Two keys built apart from equal requests are equal, hash equal, and find each other."""
    for request in VARIANTS:
        first = CacheKey.for_request(request)
        second = CacheKey.for_request(dataclasses.replace(request, min_expires_at=99.0))
        assert first is not second
        assert first == second
        assert hash(first) == hash(second) == hash(first.parts())
        assert {first: "found"}[second] == "found"


def test_keys_differing_in_any_field_are_unequal() -> None:
    """Each of the seven fields, changed alone, gives another key; a non-key is never equal."""
    base = CacheKey.for_request(VARIANTS[0])
    names = [name for name in base.__dataclass_fields__ if name != "_hash"]
    changed = {
        "role_arn": "acs:ram::1:role/x",
        "policy_digest": "0" * 64,
        "duration_seconds": 900,
        "external_id": "ext",
        "role_session_name": "svc-b",
        "effective_lifetime_seconds": 60,
        "federation": "oidc a b c",
    }
    assert sorted(changed) == sorted(names)
    others = {dataclasses.replace(base, **{name: value}) for name, value in changed.items()}
    assert len(others) == 7
    assert base not in others
    assert base != base.parts()
    assert base != "svc-a"


def test_parts_are_the_seven_fields_in_order() -> None:
    """parts() is role_arn, policy_digest, duration, external_id, session, lifetime, federation."""
    request = VARIANTS[-1]
    key = CacheKey.for_request(request)
    assert key.parts() == (
        "acs:ram::1234567890123456:role/other",
        hashlib.sha256(request.policy.encode()).hexdigest(),
        900,
        "ext-2",
        "u.bob",
        60,
        "oidc x y z",
    )
    fields = [field.name for field in dataclasses.fields(key) if field.name != "_hash"]
    assert key.parts() == tuple(getattr(key, name) for name in fields)


@pytest.fixture
async def store(clock: FakeClock) -> AsyncIterator[SharedCredentialStore]:
    """A shared store whose Redis client never connects: its key names are computed locally."""
    metrics = Metrics()
    redis = SharedRedis(Redis.from_url("redis://127.0.0.1:9/0"), metrics.shared_cache_degraded)
    yield SharedCredentialStore(redis, _KEYS, clock=clock, key_prefix=PREFIX)
    await redis.close()


@pytest.mark.parametrize("request_index", range(len(VARIANTS)))
async def test_the_shared_store_slot_digest_is_unchanged(
    store: SharedCredentialStore, request_index: int
) -> None:
    """The Redis value and lock keys are still the sha256 of the old astuple JSON of the key."""
    request = VARIANTS[request_index]
    digest = _previous_digest(request)
    assert store.value_key(request) == f"{PREFIX}cred:{digest}"
    assert store.lock_key(request) == f"{PREFIX}lock:{digest}"


def test_keys_whose_hashes_collide_are_still_told_apart() -> None:
    """Equality compares the fields, not only the hash kept at construction."""
    base = CacheKey.for_request(VARIANTS[0])
    other = CacheKey.for_request(VARIANTS[1])
    object.__setattr__(other, "_hash", hash(base))  # a collision, as a hash may have
    assert hash(other) == hash(base)
    assert other != base
    assert len({base, other}) == 2
