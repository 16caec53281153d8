"""Credential replies: rendered once per token and second, each request's id spliced in."""

from __future__ import annotations

from typing import Any

import orjson

from broker.http.replies import credentials_reply
from broker.uploads import oss_endpoint
from tests.conftest import CALLERS, BrokerFactory, BrokerHarness

PATH = "/v1/credentials/service-uploads"


async def _reply(broker: BrokerHarness, request_id: str) -> tuple[bytes, dict[str, Any]]:
    headers = {**broker.auth("svc-a"), "X-Request-Id": request_id}
    async with broker.client.get(PATH, headers=headers) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == request_id
        body = await response.read()
        return body, orjson.loads(body)


async def test_hits_in_one_second_differ_only_in_their_request_id(
    make_broker: BrokerFactory,
) -> None:
    """Two hits within a second: the same body but for RequestId, each its own request's."""
    broker = await make_broker()
    await _reply(broker, "warm-up-0001")
    first_bytes, first = await _reply(broker, "request-0001")
    second_bytes, second = await _reply(broker, "request-0002")
    assert (first["RequestId"], second["RequestId"]) == ("request-0001", "request-0002")
    assert first_bytes.replace(b"request-0001", b"request-0002") == second_bytes
    assert {**first, "RequestId": "x"} == {**second, "RequestId": "x"}


async def test_a_reused_body_is_byte_identical_to_a_fresh_rendering(
    make_broker: BrokerFactory,
) -> None:
    """The spliced body equals the reply rendered in full for that request, byte for byte."""
    broker = await make_broker()
    await _reply(broker, "warm-up-0001")
    body, parsed = await _reply(broker, "request-0003")
    services = broker.services
    (entry,) = services.cache.entries(frozenset({"svc-a"}))
    hit = services.cache.fresh(entry.key, 0, broker.clock())
    principal = await services.authenticator.authenticate(CALLERS["svc-a"][0])
    scope = services.policies.scope("service-uploads", principal)
    assert hit is not None
    assert scope is not None
    endpoint = oss_endpoint(services.settings.oss, scope.policy)
    expected = credentials_reply(
        hit.credentials, scope, endpoint, parsed["ExpiresIn"], "request-0003"
    )
    assert body == orjson.dumps(expected)


async def test_expires_in_moves_with_the_clock_not_with_the_memo(
    make_broker: BrokerFactory,
) -> None:
    """A second later the reply says one second less: bodies are never kept past their second."""
    broker = await make_broker()
    _, before = await _reply(broker, "request-0004")
    broker.clock.advance(1)
    _, after = await _reply(broker, "request-0005")
    assert after["AccessKeyId"] == before["AccessKeyId"]
    assert after["ExpiresIn"] == before["ExpiresIn"] - 1
