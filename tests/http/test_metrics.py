"""GET /metrics: Prometheus text with requests, cache, STS and reload figures."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import BrokerHarness


async def _samples(broker: BrokerHarness) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with broker.client.get("/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        text = await resp.text()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


async def test_metrics_count_requests_cache_and_sts(broker: BrokerHarness) -> None:
    """Requests by route/status, cache hits/misses, STS outcomes and reload status are exported."""
    for _ in range(3):
        await broker.get_json("/v1/credentials/avatar-upload", caller="alice")
    await broker.get_json("/v1/credentials/avatar-upload", caller="svc-a")  # 403
    broker.clock.advance(2000)
    broker.sts.emulator.faults.update({"throttle": True, "remaining": 1})
    await broker.get_json("/v1/credentials/avatar-upload", caller="alice")  # 503
    samples = await _samples(broker)
    assert samples[("broker_requests_total", (("route", "credentials"), ("status", "200")))] == 3
    assert samples[("broker_requests_total", (("route", "credentials"), ("status", "403")))] == 1
    assert samples[("broker_requests_total", (("route", "credentials"), ("status", "503")))] == 1
    assert samples[("broker_cache_hits_total", ())] == 2
    assert samples[("broker_cache_misses_total", ())] == 2
    assert samples[("broker_cache_fetches_total", ())] == 2
    assert samples[("broker_sts_calls_total", (("outcome", "success"),))] == 1
    assert samples[("broker_sts_calls_total", (("outcome", "UpstreamThrottled"),))] == 1
    assert samples[("broker_sts_call_duration_seconds_count", ())] == 2
    assert samples[("broker_policies_last_reload_successful", ())] == 1
    assert samples[("broker_policies_loaded", ())] == len(broker.services.policies)
    assert samples[("broker_cache_entries", ())] == 0  # expired entry dropped, error not cached


async def test_metrics_carry_no_caller_input(broker: BrokerHarness) -> None:
    """Unknown paths and policy names never become label values."""
    await broker.client.get("/some/random/path-canary")
    await broker.get_json("/v1/credentials/policy-name-canary", caller="alice")
    async with broker.client.get("/metrics") as resp:
        text = await resp.text()
    assert "canary" not in text
    assert 'route="unmatched"' in text
