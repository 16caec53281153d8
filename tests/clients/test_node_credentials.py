"""@alicloud/credentials (npm)' credentials_uri provider against the broker, feeding ali-oss.

The provider fetches ``/v1/credentials/<policy>?access_token=<key>`` and caches the token until
15 minutes before it expires (``dist/src/providers/session.js`` ``STALE_TIME``); ali-oss asks
it before each request through ``refreshSTSToken`` (``refreshSTSTokenInterval: 0``).  The OSS
location (endpoint, region, bucket) is configuration, read once by the test from the broker.
"""

from __future__ import annotations

from tests.clients.conftest import (
    PROVIDER_POLICY,
    DevServer,
    NodeRunner,
    oss_location,
    sum_metric,
)

OUTSIDE = "clients/someone-else/"
UPLOADS = 150


def test_credentials_uri_provider_inside_and_outside(dev: DevServer, run_node: NodeRunner) -> None:
    """The provider's credentials put and get inside the prefix; outside is 403 AccessDenied."""
    location = oss_location(dev.credentials())
    key = f"{location['Prefix']}node-provider.txt"
    steps = [
        {"op": "put", "key": key, "body": "via @alicloud/credentials"},
        {"op": "get", "key": key},
        {"op": "put", "key": f"{OUTSIDE}node-provider.txt", "body": "x"},
    ]
    client = {"provider": True, "refreshIntervalMs": 0}
    put, get, outside = run_node(steps, client=client, location=location)
    assert [put["ok"], get["ok"]] == [True, True], (put, get)
    assert get["size"] == len("via @alicloud/credentials")
    assert (outside["ok"], outside["status"], outside["code"]) == (False, 403, "AccessDenied")


def test_150_uploads_through_the_provider_fetch_credentials_once(
    dev: DevServer, run_node: NodeRunner
) -> None:
    """150 uploads with the shipped provider policy: none fails, one broker request, no STS call."""
    location = oss_location(dev.credentials(PROVIDER_POLICY))
    before = dev.metrics()
    steps = [
        {"op": "put", "key": f"{location['Prefix']}node-batch/{{i}}.txt", "repeat": UPLOADS},
        {"op": "counters"},
    ]
    client = {"provider": True, "refreshIntervalMs": 0}
    *uploads, counters = run_node(steps, client=client, location=location, policy=PROVIDER_POLICY)
    after = dev.metrics()
    failed = [result for result in uploads if not result["ok"]]
    assert (len(uploads), failed) == (UPLOADS, [])
    requests = sum_metric(after, "broker_requests_total", route="credentials") - sum_metric(
        before, "broker_requests_total", route="credentials"
    )
    sts_calls = sum_metric(after, "broker_sts_calls_total") - sum_metric(
        before, "broker_sts_calls_total"
    )
    assert requests == 1  # the provider's one fetch, not one per upload
    assert sts_calls == 0  # the broker had the token cached from the location read
    assert counters["providerCalls"] >= UPLOADS  # ali-oss asked the provider every time
    print(
        f"\nnode provider: {UPLOADS} uploads, {counters['providerCalls']} credential look-ups, "
        f"{requests:.0f} broker credential requests, {sts_calls:.0f} STS calls"
    )
