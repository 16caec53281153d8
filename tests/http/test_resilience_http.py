"""Retries, the failure gate, quotas and stale serving, end to end against the STS emulator."""

from __future__ import annotations

import asyncio

from tests.conftest import BrokerFactory


async def test_transient_throttle_is_retried(make_broker: BrokerFactory) -> None:
    """One throttled answer is retried with backoff and the caller gets 200."""
    broker = await make_broker(
        sts={"retry": {"max_attempts": 3, "base_delay_seconds": 0.01, "max_delay_seconds": 0.05}}
    )
    broker.sts.emulator.faults.update({"throttle": True, "remaining": 1})
    status, _ = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200
    assert [call.outcome for call in broker.sts.emulator.calls] == ["fault:throttle", "issued"]


async def test_non_retryable_errors_are_not_retried_and_gate_opens(
    make_broker: BrokerFactory,
) -> None:
    """A 4xx refusal (NoPermission) is not retried; after 3 in a row STS is left alone a while."""
    broker = await make_broker(
        sts={
            "retry": {"max_attempts": 3, "base_delay_seconds": 0.01},
            "failure_gate": {"threshold": 3, "open_seconds": 30},
        }
    )
    broker.sts.emulator.faults.update({"always": "error:NoPermission"})
    for _ in range(5):
        status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
        assert status == 502
        assert body["error"]["code"] == "UpstreamError"
    assert len(broker.sts.emulator.calls) == 3  # not retried, and nothing after the gate opened
    broker.sts.emulator.faults.clear()
    broker.clock.advance(31)
    status, _ = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200


async def test_caller_quota_gives_429_with_retry_after(make_broker: BrokerFactory) -> None:
    """Past its burst a caller gets 429 TooManyRequests with Retry-After; others are unaffected."""
    broker = await make_broker(quotas={"caller_requests_per_second": 1, "caller_burst": 3})
    statuses = [
        (await broker.get_json("/v1/credentials/avatar-upload", caller="alice"))[0]
        for _ in range(4)
    ]
    assert statuses == [200, 200, 200, 429]
    async with broker.client.get("/v1/policies", headers=broker.auth("alice")) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == "1"
        assert (await resp.json())["error"]["code"] == "TooManyRequests"
    status, _ = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert status == 200
    broker.clock.advance(1)
    status, _ = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 200


async def test_sts_budget_sheds_load_past_max_wait(make_broker: BrokerFactory) -> None:
    """Distinct scopes beyond the STS budget (and its bounded wait) get 503 at once."""
    broker = await make_broker(
        quotas={"sts_calls_per_second": 1, "sts_burst": 2, "sts_max_wait_seconds": 0}
    )
    pairs = [
        ("alice", "avatar-upload"),
        ("svc-a", "service-uploads"),
        ("svc-reports", "reports-read"),
    ]
    results = await asyncio.gather(
        *(broker.get_json(f"/v1/credentials/{policy}", caller=c) for c, policy in pairs)
    )
    assert sorted(status for status, _ in results) == [200, 200, 503]
    assert broker.sts.emulator.assume_role_calls() == 2


async def test_valid_token_served_while_sts_is_down(make_broker: BrokerFactory) -> None:
    """While STS fails, a cached token inside its validity keeps being served."""
    broker = await make_broker()
    _, first = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    broker.sts.emulator.faults.update({"error_status": 503})
    for _ in range(6):  # 100 s steps, up to 600 s into a 900 s token: refreshes fail
        broker.clock.advance(100)
        status, body = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
        assert status == 200
        assert body["AccessKeyId"] == first["AccessKeyId"]
        await broker.services.cache.join()
    assert broker.services.cache.stats.refresh_failures >= 1
    broker.clock.advance(300)  # past expiry - margin: nothing valid left to serve
    status, _ = await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    assert status == 503


async def test_readyz_reports_an_sts_outage_without_failing(make_broker: BrokerFactory) -> None:
    """STS down: /readyz stays 200 with sts "degraded"; a later real answer makes it "ok"."""
    broker = await make_broker()
    _, body = await broker.get_json("/readyz", caller=None)
    assert body["sts"] == {"state": "unknown", "consecutive_failures": 0, "cached_credentials": 0}
    await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    broker.sts.emulator.faults.update({"always": "error:503"})
    status, _ = await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    assert status == 503
    status, body = await broker.get_json("/readyz", caller=None)
    assert (status, body["status"]) == (200, "ready")
    assert body["sts"] == {"state": "degraded", "consecutive_failures": 1, "cached_credentials": 1}
    broker.sts.emulator.faults.clear()
    await broker.get_json("/v1/credentials/service-uploads", caller="svc-a")
    _, body = await broker.get_json("/readyz", caller=None)
    assert body["sts"]["state"] == "ok"
