"""Clock skew end to end with a movable clock: the broker and its STS, in process, clocks apart.

The fault matrix shows the first reply under skew from a real process; here
time moves by hand, to the end of the token's life, which a real-time test
could not reach.
"""

from __future__ import annotations

from datetime import UTC, datetime

from tests.conftest import BrokerFactory

POLICY = "service-uploads"  # duration_seconds 3600
MARGIN = 60


def _epoch(expiration: str) -> float:
    return datetime.strptime(expiration, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


async def test_local_clock_600s_behind_sts_never_serves_past_start_plus_duration(
    make_broker: BrokerFactory,
) -> None:
    """STS says start+600+3600; the token is served until start + 3600 - margin, never after."""
    broker = await make_broker()
    emulator, clock = broker.sts.emulator, broker.clock
    emulator.faults.update({"clock_skew_seconds": 600})
    start = clock()
    status, body = await broker.get_json(f"/v1/credentials/{POLICY}", caller="svc-a")
    assert status == 200
    assert emulator.issued[body["AccessKeyId"]].expires_at == start + 600 + 3600
    assert _epoch(body["Expiration"]) == start + 3600
    assert body["ExpiresIn"] == 3600
    emulator.faults.update({"always": "error:503"})  # refreshes fail from now on
    clock.advance(3600 - MARGIN - 1)
    status, late = await broker.get_json(f"/v1/credentials/{POLICY}", caller="svc-a")
    assert (status, late["AccessKeyId"]) == (200, body["AccessKeyId"])
    await broker.services.cache.join()
    clock.advance(1)  # local start + 3600 - margin: STS would still say 600 s are left
    status, refused = await broker.get_json(f"/v1/credentials/{POLICY}", caller="svc-a")
    assert status == 503
    assert refused["error"]["code"] == "UpstreamUnavailable"


async def test_local_clock_600s_ahead_of_sts_serves_a_shorter_but_valid_token(
    make_broker: BrokerFactory,
) -> None:
    """STS 600 s behind: Expiration looks 600 s short; served to then - margin, then refreshed."""
    broker = await make_broker()
    emulator, clock = broker.sts.emulator, broker.clock
    emulator.faults.update({"clock_skew_seconds": -600})
    start = clock()
    _, body = await broker.get_json(f"/v1/credentials/{POLICY}", caller="svc-a")
    assert body["ExpiresIn"] == 3000
    assert _epoch(body["Expiration"]) == emulator.issued[body["AccessKeyId"]].expires_at
    clock.advance(3000 - MARGIN)
    status, fresh = await broker.get_json(f"/v1/credentials/{POLICY}", caller="svc-a")
    assert status == 200
    assert fresh["AccessKeyId"] != body["AccessKeyId"]
    assert _epoch(fresh["Expiration"]) == start + 3000 - MARGIN + 3000
