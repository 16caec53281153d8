"""The fault matrix: ``sts-broker serve`` as a real process against a scripted STS emulator.

For every scenario: the status and ``Retry-After`` the caller sees, that no
expired credential is served (by the local clock or STS's), that no 500
appears (in replies or ``/metrics``), and how many calls reached STS.
Faults are scripted over the emulator's admin endpoint, as in dev mode.
Related cases share one broker process, each on a scope (caller) of its own,
since the failure gate and the cache are per scope.  Timing-sensitive cases
use small configured timeouts; assertions are on what the broker decided
(statuses, the attempt timeouts it logged), never on how long anything took.
"""

from __future__ import annotations

import asyncio

from tests.conftest import free_port
from tests.faults.conftest import (
    CALLERS,
    BrokerProcess,
    FaultySts,
    MakeFaultySts,
    Matrix,
    Reply,
    StartBroker,
    check_reply,
)

THROTTLING_CODES = ["Throttling", "Throttling.User", "Throttling.Api", "Throttling.Tenant"]
GATE_THRESHOLD = 3


async def _observe(
    broker: BrokerProcess,
    sts: FaultySts,
    matrix: Matrix,
    scenario: str,
    callers: list[str],
    *,
    policy: str = "probe",
    skew_seconds: float = 0.0,
) -> tuple[list[Reply], int]:
    """One request per caller, in order; each reply checked; the row recorded."""
    before = await sts.received()
    replies = [await broker.credentials(caller, policy) for caller in callers]
    calls = await sts.received() - before
    for reply in replies:
        check_reply(reply, sts, skew_seconds=skew_seconds)
    matrix.record(scenario, replies, calls)
    return replies, calls


async def _assert_no_500(broker: BrokerProcess) -> None:
    """Not one request of the broker's life was answered 500."""
    assert 'status="500"' not in await broker.metrics()
    assert not broker.log_events("request_crashed")


async def _recovers(broker: BrokerProcess, sts: FaultySts, caller: str) -> None:
    """Once STS is healthy again, the next request is served at once (no gate, no cool-down)."""
    await sts.clear()
    reply = await broker.credentials(caller)
    check_reply(reply, sts)
    assert reply.status == 200


def _seen(replies: list[Reply]) -> list[tuple[int, str, str | None]]:
    return [(reply.status, reply.code, reply.retry_after) for reply in replies]


async def test_every_throttling_code_is_retried_then_503(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """Each Throttling* code: retried (≥ 1 s apart), then 503 UpstreamThrottled + Retry-After."""
    broker = await start_broker(fault_sts.url, sts={"retry": {"max_attempts": 2}})
    for code, caller in zip(THROTTLING_CODES, CALLERS, strict=False):
        await fault_sts.script(always=f"throttle:{code}")
        scenario = f"always {code} (max_attempts 2)"
        replies, calls = await _observe(broker, fault_sts, matrix, scenario, [caller])
        assert _seen(replies) == [(503, "UpstreamThrottled", "1")], code
        assert calls == 2, code
    await fault_sts.clear()
    await fault_sts.script(sequence=["throttle:Throttling.User"])
    replies, calls = await _observe(broker, fault_sts, matrix, "one Throttling.User", ["probe-10"])
    assert _seen(replies) == [(200, "OK", None)]
    assert calls == 2
    await _recovers(broker, fault_sts, CALLERS[0])  # the gate never opened
    await _assert_no_500(broker)


async def test_5xx_is_retried_then_503(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """STS 500/502/503/504 (JSON): 3 attempts, then 503 UpstreamUnavailable + Retry-After."""
    broker = await start_broker(fault_sts.url)
    outcomes = ["error:500", "error:502", "error:503", "error:504"]
    for outcome, caller in zip(outcomes, CALLERS, strict=False):
        await fault_sts.script(always=outcome)
        replies, calls = await _observe(
            broker, fault_sts, matrix, f"always {outcome} (JSON body)", [caller] * 2
        )
        assert _seen(replies) == [(503, "UpstreamUnavailable", "1")] * 2, outcome
        assert calls == 6, outcome
    await _recovers(broker, fault_sts, CALLERS[0])
    await _assert_no_500(broker)


async def test_no_usable_answer_is_retried_then_503(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """HTML error pages, resets, truncated or garbage bodies: retried, then 503 + Retry-After."""
    broker = await start_broker(fault_sts.url)
    outcomes = ["html:502", "html:504", "reset", "truncated", "garbage"]
    for outcome, caller in zip(outcomes, CALLERS, strict=False):
        await fault_sts.script(always=outcome)
        replies, calls = await _observe(broker, fault_sts, matrix, f"always {outcome}", [caller])
        assert _seen(replies) == [(503, "UpstreamUnavailable", "1")], outcome
        assert calls == 3, outcome
    await _recovers(broker, fault_sts, CALLERS[0])
    await _assert_no_500(broker)


async def test_sts_failing_every_other_call_with_500_fails_no_request(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """STS answers 500 to every 2nd call: 12 of 12 requests (12 scopes) succeed."""
    broker = await start_broker(fault_sts.url)
    await fault_sts.script(every_nth=2, nth_outcome="error:500")
    replies, calls = await _observe(
        broker, fault_sts, matrix, "every 2nd call 500, 12 scopes", CALLERS
    )
    assert [reply.status for reply in replies] == [200] * 12
    assert calls == 1 + 11 * 2  # the 1st call succeeds, then each request meets one 500
    outcomes = (await fault_sts.counts())["outcomes"]
    assert outcomes.count("fault:error:500") == 11
    nonces = [call.nonce for call in fault_sts.emulator.calls]
    assert len(set(nonces)) == len(nonces) == 23  # every retry signed afresh
    await _assert_no_500(broker)


async def test_sts_unreachable_is_503_and_readyz_stays_up(
    start_broker: StartBroker, matrix: Matrix
) -> None:
    """Nothing listening where STS should be: 503 + Retry-After; /readyz 200, sts degraded."""
    broker = await start_broker(f"http://127.0.0.1:{free_port()}")
    reply = await broker.credentials("probe-00")
    matrix.record("STS unreachable (connection refused), cold cache", [reply], 0)
    assert _seen([reply]) == [(503, "UpstreamUnavailable", "1")]
    ready = await broker.get("/readyz")
    assert (ready.status, ready.body["status"]) == (200, "ready")
    assert ready.body["sts"] == {
        "state": "degraded",
        "consecutive_failures": 3,
        "cached_credentials": 0,
    }
    await _assert_no_500(broker)


async def test_timeouts_below_the_deadline_are_absorbed(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """A slow STS within the timeout: 200; an attempt hung past it: retried, 200 in time."""
    broker = await start_broker(
        fault_sts.url, sts={"timeout_seconds": 0.5, "retry": {"deadline_seconds": 4}}
    )
    await fault_sts.script(sequence=["delay:0.2"])
    scenario = "answer after 0.2 s (timeout 0.5 s)"
    replies, calls = await _observe(broker, fault_sts, matrix, scenario, ["probe-00"])
    assert (_seen(replies), calls) == ([(200, "OK", None)], 1)
    await fault_sts.script(sequence=["delay:3"])
    scenario = "1st attempt hangs 3 s (timeout 0.5 s, deadline 4 s)"
    replies, calls = await _observe(broker, fault_sts, matrix, scenario, ["probe-01"])
    assert (_seen(replies), calls) == ([(200, "OK", None)], 2)
    await _assert_no_500(broker)


async def test_a_hung_sts_is_answered_504_by_the_deadline(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """STS hangs past the deadline: 504 + Retry-After; attempt timeouts cut to fit the deadline."""
    broker = await start_broker(
        fault_sts.url,
        sts={"timeout_seconds": 0.4, "retry": {"deadline_seconds": 1.0, "max_attempts": 5}},
    )
    await fault_sts.script(delay_seconds=3)
    scenario = "STS hangs (timeout 0.4 s, deadline 1 s, 5 attempts allowed)"
    replies, calls = await _observe(broker, fault_sts, matrix, scenario, ["probe-00"])
    assert _seen(replies) == [(504, "UpstreamTimeout", "1")]
    (failed,) = await broker.wait_for_events("request_failed")
    timeouts = failed["ctx_attempt_timeouts"]
    assert timeouts[0] == 0.4
    assert all(timeout <= 0.4 for timeout in timeouts)
    assert sum(timeouts) <= 1.0
    assert 2 <= calls <= len(timeouts)
    metrics = await broker.metrics()
    assert f'broker_sts_calls_total{{outcome="UpstreamTimeout"}} {len(timeouts)}.0' in metrics
    assert 'outcome="success"' not in metrics
    await _assert_no_500(broker)


async def test_refusals_and_unusable_credentials_are_502_and_open_the_gate(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """4xx, or Expiration past/9999/unparseable/missing: 502, not retried, gate after 3."""
    broker = await start_broker(fault_sts.url)
    outcomes = [
        "error:NoPermission",
        "error:EntityNotExist.Role",
        "expiration:past",
        "expiration:far_future",
        "expiration:unparseable",
        "expiration:missing",
        "credentials:missing",
    ]
    for outcome, caller in zip(outcomes, CALLERS, strict=False):
        await fault_sts.script(always=outcome)
        scenario = f"always {outcome}, 4 requests"
        replies, calls = await _observe(broker, fault_sts, matrix, scenario, [caller] * 4)
        assert _seen(replies) == [(502, "UpstreamError", None)] * 4, outcome
        assert calls == GATE_THRESHOLD, outcome  # the 4th is answered by the failure gate
    await _assert_no_500(broker)


async def test_clock_skew_of_600s_never_serves_past_the_real_end(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """STS's clock ±600 s from ours: served until local start + duration at most, still usable."""
    broker = await start_broker(fault_sts.url)
    cases = [  # (STS ahead by, policy, ExpiresIn expected, caller)
        (600, "probe", 3600, "probe-00"),
        (-600, "probe", 3000, "probe-01"),
        (-600, "probe-short", 300, "probe-02"),
    ]
    for skew, policy, lifetime, caller in cases:
        await fault_sts.script(clock_skew_seconds=skew)
        side = "behind" if skew > 0 else "ahead of"
        scenario = f"local clock {abs(skew)} s {side} STS, {policy} ({lifetime} s left)"
        replies, calls = await _observe(
            broker, fault_sts, matrix, scenario, [caller], policy=policy, skew_seconds=skew
        )
        (reply,) = replies
        assert reply.status == 200, scenario
        assert lifetime - 5 <= reply.body["ExpiresIn"] <= lifetime, scenario
        assert calls == 1
    await fault_sts.script(clock_skew_seconds=960)
    scenario = "local clock 960 s behind STS (past OpenAPI's 15 minutes)"
    replies, calls = await _observe(broker, fault_sts, matrix, scenario, ["probe-03"])
    assert _seen(replies) == [(502, "UpstreamError", None)]
    assert "InvalidTimeStamp.Expired" in replies[0].body["error"]["message"]
    await _assert_no_500(broker)


async def test_sts_down_with_a_warm_and_a_cold_cache(
    fault_sts: FaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """STS down: a cached scope is served without an STS call, an uncached one gets 503."""
    broker = await start_broker(fault_sts.url)
    first = await broker.credentials("probe-00")
    assert first.status == 200
    await fault_sts.script(always="error:503")
    replies, calls = await _observe(
        broker, fault_sts, matrix, "STS down (503), warm cache", ["probe-00"] * 3
    )
    assert _seen(replies) == [(200, "OK", None)] * 3
    assert {reply.body["AccessKeyId"] for reply in replies} == {first.body["AccessKeyId"]}
    assert calls == 0
    replies, calls = await _observe(
        broker, fault_sts, matrix, "STS down (503), cold cache", ["probe-01"] * 2
    )
    assert _seen(replies) == [(503, "UpstreamUnavailable", "1")] * 2
    assert calls == 6
    ready = await broker.get("/readyz")
    assert (ready.status, ready.body["status"]) == (200, "ready")
    assert ready.body["sts"] == {
        "state": "degraded",
        "consecutive_failures": 6,
        "cached_credentials": 1,
    }
    await _assert_no_500(broker)


async def test_sts_down_during_a_background_refresh(
    make_fault_sts: MakeFaultySts, start_broker: StartBroker, matrix: Matrix
) -> None:
    """The refresh fails: the valid token keeps being served, never past its margin, then 503."""
    sts = await make_fault_sts(issued_lifetime_seconds=6)
    broker = await start_broker(sts.url, cache={"refresh_margin_seconds": 1})
    first = await broker.credentials("probe-00")
    check_reply(first, sts)
    await sts.script(always="error:503")
    replies = [first]
    for _ in range(200):  # bounded: the token lives 6 s; at most 200 polls 0.05 s apart
        reply = await broker.credentials("probe-00")
        check_reply(reply, sts)
        replies.append(reply)
        if reply.status != 200:
            break
        assert reply.body["AccessKeyId"] == first.body["AccessKeyId"]
        await asyncio.sleep(0.05)
    calls = await sts.received()
    matrix.record("STS down (503) during a background refresh, 6 s token", replies, calls)
    assert _seen(replies[-1:]) == [(503, "UpstreamUnavailable", "1")]
    assert all(reply.status == 200 for reply in replies[:-1])
    assert await broker.wait_for_events("background_refresh_failed")
    assert calls == 1 + 3 + 3  # first fetch; one background refresh, retried; the final miss
    await _assert_no_500(broker)
