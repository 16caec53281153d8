"""CORS: exact origins only, preflights only for allowed methods and headers."""

from __future__ import annotations

import pytest

from tests.conftest import BrokerFactory, BrokerHarness

ORIGIN = "https://app.example.com"


@pytest.fixture
async def broker(make_broker: BrokerFactory) -> BrokerHarness:
    return await make_broker(cors={"allow_origins": [ORIGIN]})


async def _preflight(
    broker: BrokerHarness, origin: str, method: str = "POST", headers: str = "authorization"
) -> tuple[int, dict[str, str]]:
    request_headers = {
        "Origin": origin,
        "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": headers,
    }
    async with broker.client.options("/v1/presign", headers=request_headers) as resp:
        return resp.status, dict(resp.headers)


async def test_allowed_origin_preflight(broker: BrokerHarness) -> None:
    """A preflight from the allowed origin for POST with Authorization is answered."""
    status, headers = await _preflight(broker, ORIGIN, headers="authorization, content-type")
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Access-Control-Allow-Credentials" not in headers
    assert "POST" in headers["Access-Control-Allow-Methods"]


@pytest.mark.parametrize(
    "origin",
    [
        "https://app.example.com.evil.com",
        "http://app.example.com",
        "null",
        "https://evil.com",
        "https://app.example.com:444",
        "https://xapp.example.com",
    ],
)
async def test_lookalike_origins_are_refused(broker: BrokerHarness, origin: str) -> None:
    """Lookalike, downgraded and null origins get no Access-Control-Allow-Origin."""
    status, headers = await _preflight(broker, origin)
    assert status == 403
    assert "Access-Control-Allow-Origin" not in headers
    async with broker.client.get("/healthz", headers={"Origin": origin}) as resp:
        assert "Access-Control-Allow-Origin" not in resp.headers


@pytest.mark.parametrize(("method", "headers"), [("DELETE", ""), ("POST", "x-custom")])
async def test_preflight_for_other_methods_or_headers_is_refused(
    broker: BrokerHarness, method: str, headers: str
) -> None:
    """Only GET/POST and the broker's own request headers pass a preflight."""
    status, reply = await _preflight(broker, ORIGIN, method, headers)
    assert status == 403
    assert "Access-Control-Allow-Origin" not in reply


async def test_actual_request_from_allowed_origin_is_tagged(broker: BrokerHarness) -> None:
    """A real request from the allowed origin gets its origin echoed, never '*'."""
    headers = {**broker.auth("alice"), "Origin": ORIGIN}
    async with broker.client.get("/v1/credentials/avatar-upload", headers=headers) as resp:
        assert resp.status == 200
        assert resp.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Origin" in resp.headers.getall("Vary")


async def test_without_configured_origins_preflights_are_refused_and_replies_untagged(
    make_broker: BrokerFactory,
) -> None:
    """No cors.allow_origins: a preflight is 403 CorsRejected and replies carry no CORS headers."""
    plain = await make_broker()
    status, headers = await _preflight(plain, ORIGIN)
    assert status == 403
    assert "Access-Control-Allow-Origin" not in headers
    async with plain.client.options("/v1/presign", headers={"Origin": ORIGIN}) as resp:
        assert resp.status == 405  # a plain OPTIONS is no preflight
    async with plain.client.get("/healthz", headers={"Origin": ORIGIN}) as resp:
        assert resp.status == 200
        assert "Access-Control-Allow-Origin" not in resp.headers
