"""API-key callers decided once per header and address (broker/http/admissions.py), over HTTP.

The first request of an API-key caller is authenticated the whole way; the
next one with the same ``Authorization`` header from the same address is
admitted by ``Admissions``.  These tests pin that nothing else changes: a
revocation or an auth reload refuses at once, duplicate headers and query
tokens are judged as before, JWT callers are verified every time, addresses
behind trusted proxies stay apart, route allowances and quotas still apply,
and the memo holds no key in clear.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa
from multidict import CIMultiDict

from broker.auth import Revocations, hash_api_key
from broker.http.keys import ADMISSIONS
from broker.models import Principal
from broker.reload import reload_auth
from broker.revocation import revoke
from tests.conftest import CALLERS, BrokerFactory, BrokerHarness, write_jwks
from tests.http import test_jwt
from tests.http.test_client_address import _bound_to
from tests.http.test_credentials import (
    CREDENTIALS_ONLY,
    _as_provider,
    _restricted_broker,
)
from tests.http.test_jwt import AUDIENCE, ISSUER, _token

signing_key = test_jwt.signing_key  # fixture: the identity provider's RSA key

CREDENTIALS = "/v1/credentials/service-uploads"


class AuthenticateSpy:
    """Counts the calls to the broker's real ``Authenticator.authenticate`` (the whole way)."""

    def __init__(self, broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls = 0
        authenticator = broker.services.authenticator
        real: Callable[[str], Awaitable[Principal]] = authenticator.authenticate

        async def counted(token: str) -> Principal:
            self.calls += 1
            return await real(token)

        monkeypatch.setattr(authenticator, "authenticate", counted)


def _admissions(broker: BrokerHarness) -> Any:
    return broker.client.app[ADMISSIONS]


async def _get(
    broker: BrokerHarness, path: str, headers: Any = None, caller: str | None = "svc-a"
) -> tuple[int, Any]:
    sent = CIMultiDict(broker.auth(caller) if caller else {})
    sent.extend(headers or {})
    async with broker.client.get(path, headers=sent) as resp:
        return resp.status, await resp.json()


async def test_a_second_request_is_admitted_by_the_memo(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two requests with one key: one entry, one authentication, the same caller and reply shape."""
    spy = AuthenticateSpy(broker, monkeypatch)
    first_status, first = await _get(broker, CREDENTIALS)
    assert (first_status, len(_admissions(broker))) == (200, 1)
    second_status, second = await _get(broker, CREDENTIALS)
    assert (second_status, len(_admissions(broker))) == (200, 1)
    assert spy.calls == 1
    assert list(second) == list(first)
    assert second["Oss"] == first["Oss"]
    assert first["Oss"]["Prefix"] == "services/svc-a/"
    assert second["AccessKeyId"] == first["AccessKeyId"]
    assert broker.sts.emulator.assume_role_calls() == 1


async def test_a_revocation_refuses_the_very_next_request(broker: BrokerHarness) -> None:
    """After revoke(), the remembered header is 401 at once; another kept caller is re-decided."""
    for caller in ("svc-a", "svc-a", "svc-reports"):
        assert (await _get(broker, CREDENTIALS, caller=caller))[0] == 200
    assert len(_admissions(broker)) == 2
    await revoke(broker.services, Revocations(callers=frozenset({"svc-a"})))
    status, body = await _get(broker, CREDENTIALS)
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    status, body = await _get(broker, CREDENTIALS)
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    status, _ = await _get(broker, "/v1/policies", caller="svc-reports")
    assert status == 200


def _write_auth(path: Path, drop: str = "") -> None:
    """A configuration file holding the harness's API keys, minus ``drop``."""
    keys = [
        {"id": caller, "key_sha256": hash_api_key(key), "groups": list(groups)}
        for caller, (key, groups) in CALLERS.items()
        if caller != drop
    ]
    path.write_text(json.dumps({"auth": {"api_keys": keys}}))  # JSON is YAML


async def test_an_auth_reload_removing_the_key_refuses_it_next(
    broker: BrokerHarness, tmp_path: Path
) -> None:
    """A reload_auth that drops svc-a's key: its remembered header is 401 on the next request."""
    config = tmp_path / "broker.yaml"
    _write_auth(config)
    services = broker.services
    services.settings = services.settings.model_copy(update={"source": config})
    assert (await _get(broker, CREDENTIALS))[0] == 200
    assert (await _get(broker, CREDENTIALS))[0] == 200
    assert len(_admissions(broker)) == 1
    _write_auth(config, drop="svc-a")
    assert reload_auth(services) is True
    status, body = await _get(broker, CREDENTIALS)
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    assert (await _get(broker, "/v1/policies", caller="svc-reports"))[0] == 200


@pytest.mark.parametrize("second_key", ["svc-a", "alice"])
async def test_two_authorization_headers_stay_refused_after_admission(
    broker: BrokerHarness, second_key: str
) -> None:
    """The admitted header plus another Authorization header is still 400 RequestInvalid."""
    assert (await _get(broker, CREDENTIALS))[0] == 200
    status, body = await _get(broker, CREDENTIALS, headers=broker.auth(second_key))
    assert (status, body["error"]["code"]) == (400, "RequestInvalid")
    assert body["error"]["message"] == "give one Authorization header or one access_token, once"


async def test_a_query_string_takes_the_whole_way(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ?min_ttl_seconds=0 the admitted header is authenticated again, and still served."""
    assert (await _get(broker, CREDENTIALS))[0] == 200
    spy = AuthenticateSpy(broker, monkeypatch)
    status, body = await _get(broker, f"{CREDENTIALS}?min_ttl_seconds=0")
    assert (status, body["Oss"]["Prefix"]) == (200, "services/svc-a/")
    assert (spy.calls, len(_admissions(broker))) == (1, 1)


async def test_a_query_only_caller_is_never_kept(
    broker: BrokerHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """?access_token= callers are authenticated on every request and never enter the memo."""
    spy = AuthenticateSpy(broker, monkeypatch)
    path = f"{CREDENTIALS}?access_token={CALLERS['svc-a'][0]}"
    for _ in range(2):
        assert (await _get(broker, path, caller=None))[0] == 200
    assert (spy.calls, len(_admissions(broker))) == (2, 0)


async def test_access_token_beside_the_admitted_header_is_refused_as_before(
    broker: BrokerHarness,
) -> None:
    """The admitted header plus ?access_token= (any token) is 400, as without the memo."""
    assert (await _get(broker, CREDENTIALS))[0] == 200
    for token in (CALLERS["svc-a"][0], CALLERS["alice"][0]):
        status, body = await _get(broker, f"{CREDENTIALS}?access_token={token}")
        assert (status, body["error"]["code"]) == (400, "RequestInvalid")
        assert "not both" in body["error"]["message"]


@pytest.fixture
async def jwt_broker(
    make_broker: BrokerFactory, tmp_path: Path, signing_key: rsa.RSAPrivateKey
) -> BrokerHarness:
    """A broker accepting browser JWTs (tests/http/test_jwt.py's issuer) beside the API keys."""
    jwks = write_jwks(tmp_path / "jwks.json", signing_key.public_key())
    settings = {"issuer": ISSUER, "audience": AUDIENCE, "jwks_file": str(jwks)}
    return await make_broker(auth={"jwt": settings | {"groups": ["browser"]}})


async def test_jwt_callers_are_never_kept(
    jwt_broker: BrokerHarness, signing_key: rsa.RSAPrivateKey, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same JWT twice: verified twice, no entry; once expired, the same header is 401."""
    broker = jwt_broker
    spy = AuthenticateSpy(broker, monkeypatch)
    token = _token(signing_key, broker.clock(), sub="bob")
    headers = {"Authorization": f"Bearer {token}"}
    for _ in range(2):
        status, body = await _get(broker, "/v1/credentials/avatar-upload", headers, caller=None)
        assert (status, body["Oss"]["Prefix"]) == (200, "avatars/bob/")
    assert (spy.calls, len(_admissions(broker))) == (2, 0)
    broker.clock.advance(300 + 30)  # the token's exp (iat + 300) plus the verifier's leeway
    status, body = await _get(broker, "/v1/credentials/avatar-upload", headers, caller=None)
    assert (status, body["error"]["code"]) == (401, "AuthenticationFailed")
    assert len(_admissions(broker)) == 0


async def test_each_forwarded_client_is_its_own_entry(make_broker: BrokerFactory) -> None:
    """Behind a trusted proxy each X-Forwarded-For is one entry, bound to its own address."""
    broker = await make_broker(listen={"trusted_proxies": ["127.0.0.0/8"]})
    ids = []
    for forwarded in ("198.51.100.1", "203.0.113.9", "198.51.100.1", "203.0.113.9"):
        headers = {"X-Forwarded-For": forwarded}
        status, body = await _get(broker, "/v1/credentials/pinned-reads", headers)
        assert status == 200
        ids.append(body["AccessKeyId"])
    assert len(_admissions(broker)) == 2
    assert ids[0] == ids[2] != ids[1] == ids[3]
    assert [_bound_to(call.params["Policy"]) for call in broker.sts.emulator.calls] == [
        "198.51.100.1",
        "203.0.113.9",
    ]


async def test_an_untrusted_x_forwarded_for_is_one_entry(make_broker: BrokerFactory) -> None:
    """Without trusted proxies a varying X-Forwarded-For changes nothing: one entry, the peer."""
    broker = await make_broker()
    for forwarded in ("198.51.100.1", "203.0.113.9"):
        headers = {"X-Forwarded-For": forwarded}
        assert (await _get(broker, "/v1/credentials/pinned-reads", headers))[0] == 200
    assert len(_admissions(broker)) == 1
    [call] = broker.sts.emulator.calls
    assert _bound_to(call.params["Policy"]) == "127.0.0.1"


async def test_a_restricted_key_is_refused_other_routes_after_admission(
    make_broker: BrokerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A credentials-only key admitted once is still 403 on /v1/policies, then served again."""
    broker = await _restricted_broker(make_broker, CREDENTIALS_ONLY)
    assert (await _as_provider(broker, "GET", CREDENTIALS))[0] == 200
    spy = AuthenticateSpy(broker, monkeypatch)
    status, reply = await _as_provider(broker, "GET", "/v1/policies")
    assert (status, reply["error"]["code"]) == (403, "AccessDenied")
    presign = {"policy": "service-uploads", "key": "services/svc-provider/x"}
    status, reply = await _as_provider(broker, "POST", "/v1/presign", presign)
    assert (status, reply["error"]["code"]) == (403, "AccessDenied")
    assert (await _as_provider(broker, "GET", CREDENTIALS))[0] == 200
    assert (spy.calls, len(_admissions(broker))) == (0, 1)  # every one admitted by the memo


async def test_the_request_quota_counts_memo_admitted_requests(
    make_broker: BrokerFactory,
) -> None:
    """With a burst of 3, the 4th request (3 of them memo-admitted) is 429; a second later, 200."""
    broker = await make_broker(quotas={"caller_requests_per_second": 1, "caller_burst": 3})
    assert [(await _get(broker, CREDENTIALS))[0] for _ in range(3)] == [200, 200, 200]
    status, body = await _get(broker, CREDENTIALS)
    assert (status, body["error"]["code"]) == (429, "TooManyRequests")
    assert len(_admissions(broker)) == 1
    broker.clock.advance(1)
    assert (await _get(broker, CREDENTIALS))[0] == 200


async def test_the_memo_holds_no_key_in_clear(broker: BrokerHarness) -> None:
    """No entry's key or value, at any depth of its repr, contains an API key."""
    for caller in ("svc-a", "svc-reports", "alice"):
        await _get(broker, "/v1/policies", caller=caller)
    entries = _admissions(broker)._entries
    assert len(entries) == 3
    text = repr(entries)
    for key, _ in CALLERS.values():
        assert key not in text
        assert key.encode() not in b"".join(entry[0] for entry in entries)
