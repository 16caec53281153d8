"""Retry policy, failure gate and their composition around a stub fetch, with time moved by hand.

These pin composition only: the stub stands for the STS call, whose real
path (and error translation) is tested against the emulator elsewhere.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from broker.credentials.budget import StsBudget
from broker.credentials.resilience import FailureGate, RetryPolicy, is_retryable, with_resilience
from broker.errors import (
    AccessDenied,
    BrokerError,
    RequestInvalid,
    TemplateValueRejected,
    UpstreamError,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from tests.conftest import FakeClock, FakeSleep

START = 1_000_000.0
ROLE_NOT_FOUND = "STS AssumeRole failed: EntityNotExist.Role"


class Script:
    """A stub attempt or fetch that plays its outcomes in order (the last repeats).

    Records what it was called with: the timeout when ``RetryPolicy.run`` calls
    it, the request when ``with_resilience`` does.
    """

    def __init__(self, *outcomes: str | BaseException, clock: FakeClock | None = None) -> None:
        self.outcomes = list(outcomes)
        self.calls: list[Any] = []
        self.clock = clock
        self.seconds_per_call = 0.0

    async def __call__(self, arg: Any = "req") -> str:
        self.calls.append(arg)
        if self.clock is not None:
            self.clock.advance(self.seconds_per_call)
        outcome = self.outcomes.pop(0) if len(self.outcomes) > 1 else self.outcomes[0]
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(START)


@pytest.fixture
def sleep(clock: FakeClock) -> FakeSleep:
    return FakeSleep(clock)


def _policy(clock: FakeClock, sleep: FakeSleep, draw: float = 0.5, **options: Any) -> RetryPolicy:
    return RetryPolicy(clock=clock, sleep=sleep, random=lambda: draw, **options)


async def test_retries_timeouts_until_success(clock: FakeClock, sleep: FakeSleep) -> None:
    """Timeouts are retried with growing backoff until an attempt succeeds."""
    fetch = Script(UpstreamTimeout(), UpstreamTimeout(), "creds")
    assert await _policy(clock, sleep).run(fetch) == "creds"
    assert len(fetch.calls) == 3
    assert sleep.delays == pytest.approx([0.05, 0.1])


async def test_unavailable_is_retried_after_backoff_not_retry_after(
    clock: FakeClock, sleep: FakeSleep
) -> None:
    """A 5xx or reset waits only the jittered backoff: Retry-After 1 is for the broker's caller."""
    fetch = Script(UpstreamUnavailable(), UpstreamUnavailable(), "creds")
    assert await _policy(clock, sleep).run(fetch) == "creds"
    assert sleep.delays == pytest.approx([0.05, 0.1])


@pytest.mark.parametrize("draw", [0.0, 0.3, 0.999])
async def test_backoff_is_full_jitter_under_the_cap(
    clock: FakeClock, sleep: FakeSleep, draw: float
) -> None:
    """Delay n is random() * min(max_delay, base * 2**n): within [0, that cap]."""
    policy = _policy(
        clock, sleep, draw, max_attempts=7, base_delay_seconds=0.1, max_delay_seconds=0.5
    )
    with pytest.raises(UpstreamTimeout):
        await policy.run(Script(UpstreamTimeout()))
    caps = [0.1, 0.2, 0.4, 0.5, 0.5, 0.5]
    assert sleep.delays == pytest.approx([draw * cap for cap in caps])
    assert all(0.0 <= delay <= cap for delay, cap in zip(sleep.delays, caps, strict=True))


async def test_throttled_waits_at_least_retry_after(clock: FakeClock, sleep: FakeSleep) -> None:
    """A throttled reply's Retry-After is the minimum delay before the next attempt."""
    fetch = Script(UpstreamThrottled(retry_after=2), "creds")
    assert await _policy(clock, sleep).run(fetch) == "creds"
    assert sleep.delays == [2.0]


@pytest.mark.parametrize(
    "error",
    [
        UpstreamUnavailable(retry_after=1),
        UpstreamError("STS could not be reached", retryable=True),
    ],
    ids=["unavailable", "transport"],
)
async def test_transient_failures_are_retried(
    clock: FakeClock, sleep: FakeSleep, error: BrokerError
) -> None:
    """Unavailability and transport errors marked retryable get another attempt."""
    fetch = Script(error, "creds")
    assert await _policy(clock, sleep).run(fetch) == "creds"
    assert len(fetch.calls) == 2


@pytest.mark.parametrize(
    "error",
    [
        AccessDenied(policy="avatar-upload"),
        RequestInvalid(),
        UpstreamError(ROLE_NOT_FOUND),
        UpstreamError("STS reply has incomplete credentials", retryable=False),
        UpstreamThrottled("STS call budget exhausted", retryable=False),
    ],
    ids=["access-denied", "invalid", "bad-role", "bad-reply", "budget"],
)
async def test_non_retryable_errors_are_raised_at_once(
    clock: FakeClock, sleep: FakeSleep, error: BrokerError
) -> None:
    """Errors that another attempt cannot fix are raised after one call, without sleeping."""
    fetch = Script(error)
    with pytest.raises(type(error)) as caught:
        await _policy(clock, sleep).run(fetch)
    assert caught.value is error
    assert len(fetch.calls) == 1
    assert sleep.delays == []
    assert not is_retryable(error)


@pytest.mark.parametrize(
    ("error", "retryable"),
    [
        (UpstreamThrottled(), True),
        (UpstreamUnavailable(), True),
        (UpstreamTimeout(), True),
        (UpstreamError(ROLE_NOT_FOUND), False),
        (UpstreamError("STS could not be reached", retryable=True), True),
        (UpstreamThrottled("STS call budget exhausted", retryable=False), False),
        (AccessDenied(policy="p"), False),
        (BrokerError(), False),
    ],
)
def test_retryable_is_an_attribute_with_class_defaults(error: BrokerError, retryable: bool) -> None:
    """``retryable`` comes from the class (throttled, unavailable, timeout) or the instance."""
    assert error.retryable is retryable
    assert "retryable" not in error.context
    assert is_retryable(error) is (retryable and isinstance(error, UpstreamError))


async def test_foreign_exceptions_are_not_retried(clock: FakeClock, sleep: FakeSleep) -> None:
    """An exception outside the broker's tree (a bug) propagates from the first attempt."""
    fetch = Script(KeyError("boom"))
    with pytest.raises(KeyError):
        await _policy(clock, sleep).run(fetch)
    assert len(fetch.calls) == 1


async def test_stops_at_max_attempts(clock: FakeClock, sleep: FakeSleep) -> None:
    """After max_attempts failures the last error is raised."""
    last = UpstreamTimeout()
    fetch = Script(UpstreamTimeout(), UpstreamTimeout(), last)
    with pytest.raises(UpstreamTimeout) as caught:
        await _policy(clock, sleep, max_attempts=3).run(fetch)
    assert caught.value is last
    assert len(fetch.calls) == 3
    assert len(sleep.delays) == 2


async def test_never_sleeps_past_the_deadline(clock: FakeClock, sleep: FakeSleep) -> None:
    """When the next delay would end after the deadline, the last error is raised instead."""
    fetch = Script(UpstreamThrottled(retry_after=3))
    with pytest.raises(UpstreamThrottled):
        await _policy(clock, sleep, max_attempts=10, deadline_seconds=8.0).run(fetch)
    assert sleep.delays == [3.0, 3.0]
    assert len(fetch.calls) == 3


async def test_deadline_counts_time_spent_in_attempts(clock: FakeClock, sleep: FakeSleep) -> None:
    """Slow attempts use up the deadline too."""
    fetch = Script(UpstreamTimeout(), clock=clock)
    fetch.seconds_per_call = 4.0
    policy = _policy(clock, sleep, 1.0, base_delay_seconds=1.0, deadline_seconds=8.0)
    with pytest.raises(UpstreamTimeout):
        await policy.run(fetch)
    assert len(fetch.calls) == 2
    assert sleep.delays == [1.0]


class HungSts:
    """An attempt against an STS that never answers: it uses its whole timeout, then times out."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.timeouts: list[float] = []

    async def __call__(self, seconds: float) -> str:
        self.timeouts.append(seconds)
        self.clock.advance(seconds)
        raise UpstreamTimeout()


async def test_documented_defaults_answer_a_hung_sts_within_the_deadline(
    clock: FakeClock, sleep: FakeSleep
) -> None:
    """5 s timeout, 8 s deadline: the second attempt is cut to what is left; done at 8 s."""
    hung = HungSts(clock)
    policy = _policy(clock, sleep, attempt_timeout_seconds=5.0, deadline_seconds=8.0)
    with pytest.raises(UpstreamTimeout) as caught:
        await policy.run(hung)
    assert hung.timeouts == pytest.approx([5.0, 8.0 - 5.0 - 0.05])
    assert clock() - START == pytest.approx(8.0)
    assert caught.value.context["attempts"] == 2
    assert caught.value.context["attempt_timeouts"] == [5.0, 2.95]


async def test_no_attempt_starts_that_could_not_finish(clock: FakeClock, sleep: FakeSleep) -> None:
    """With less than min_attempt_seconds left after the backoff, no further attempt is made."""
    hung = HungSts(clock)
    policy = _policy(
        clock, sleep, 1.0, attempt_timeout_seconds=0.3, deadline_seconds=0.45, max_attempts=5
    )
    with pytest.raises(UpstreamTimeout):
        await policy.run(hung)
    assert hung.timeouts == pytest.approx([0.3])  # 0.3 + backoff 0.1 leaves 0.05: too little
    assert sleep.delays == []
    assert clock() - START <= 0.45


@pytest.mark.parametrize("attempt_timeout", [0.3, 5.0, 20.0])
async def test_attempt_timeouts_never_add_up_past_the_deadline(
    clock: FakeClock, sleep: FakeSleep, attempt_timeout: float
) -> None:
    """Whatever the attempt timeout, attempts and backoffs end by the deadline."""
    hung = HungSts(clock)
    policy = _policy(
        clock, sleep, attempt_timeout_seconds=attempt_timeout, deadline_seconds=8.0, max_attempts=9
    )
    with pytest.raises(UpstreamTimeout):
        await policy.run(hung)
    assert all(timeout <= attempt_timeout for timeout in hung.timeouts)
    assert sum(hung.timeouts) + sum(sleep.delays) <= 8.0 + 1e-9
    assert clock() - START <= 8.0 + 1e-9


async def test_retry_after_beyond_deadline_is_not_shortened(
    clock: FakeClock, sleep: FakeSleep
) -> None:
    """A Retry-After that does not fit the deadline ends the retries rather than being ignored."""
    fetch = Script(UpstreamThrottled(retry_after=10))
    with pytest.raises(UpstreamThrottled):
        await _policy(clock, sleep, deadline_seconds=8.0).run(fetch)
    assert len(fetch.calls) == 1
    assert sleep.delays == []


def test_gate_opens_after_threshold(clock: FakeClock) -> None:
    """The gate opens on the threshold-th failure and replays a fresh copy of the error."""
    gate = FailureGate(threshold=3, clock=clock)
    error = UpstreamError(ROLE_NOT_FOUND, sts_code="EntityNotExist.Role")
    for _ in range(2):
        gate.record_failure("role", error)
        gate.check("role")
    gate.record_failure("role", error)
    with pytest.raises(UpstreamError) as caught:
        gate.check("role")
    assert caught.value is not error
    assert (type(caught.value), caught.value.code, str(caught.value)) == (
        UpstreamError,
        "UpstreamError",
        ROLE_NOT_FOUND,
    )
    assert caught.value.context["failure_gate"] == "open"
    assert "failure_gate" not in error.context


@pytest.mark.parametrize(
    "error",
    [AccessDenied(policy="p"), TemplateValueRejected(variable="subject"), RequestInvalid("bad")],
)
def test_gate_replays_the_same_class_and_message(clock: FakeClock, error: BrokerError) -> None:
    """While open, the gate raises the remembered error's class, code and message."""
    gate = FailureGate(threshold=1, clock=clock)
    gate.record_failure("key", error)
    with pytest.raises(type(error)) as caught:
        gate.check("key")
    assert (caught.value.code, caught.value.message) == (error.code, error.message)


def test_gate_ignores_transient_failures(clock: FakeClock) -> None:
    """Throttling, unavailability, timeouts and transport errors never open the gate."""
    gate = FailureGate(threshold=1, clock=clock)
    for error in (
        UpstreamThrottled(),
        UpstreamThrottled("STS call budget exhausted", retryable=False),
        UpstreamUnavailable(),
        UpstreamTimeout(),
        UpstreamError("STS could not be reached", retryable=True),
    ):
        gate.record_failure("role", error)
    gate.check("role")
    assert len(gate) == 0


def test_gate_closes_after_open_seconds(clock: FakeClock) -> None:
    """After open_seconds one call goes through; another failure reopens the gate at once."""
    gate = FailureGate(threshold=2, open_seconds=30.0, clock=clock)
    error = UpstreamError(ROLE_NOT_FOUND)
    gate.record_failure("role", error)
    gate.record_failure("role", error)
    clock.advance(29.9)
    with pytest.raises(UpstreamError):
        gate.check("role")
    clock.advance(0.1)
    gate.check("role")
    gate.record_failure("role", error)
    with pytest.raises(UpstreamError):
        gate.check("role")


def test_gate_success_resets_the_count(clock: FakeClock) -> None:
    """A success forgets earlier failures: the threshold counts consecutive failures."""
    gate = FailureGate(threshold=3, clock=clock)
    error = UpstreamError(ROLE_NOT_FOUND)
    for _ in range(2):
        gate.record_failure("role", error)
    gate.record_success("role")
    for _ in range(2):
        gate.record_failure("role", error)
    gate.check("role")


def test_gate_keys_are_independent_and_bounded(clock: FakeClock) -> None:
    """One key's open gate does not block another; at most max_keys keys are remembered."""
    gate = FailureGate(threshold=1, clock=clock, max_keys=5)
    for index in range(20):
        gate.record_failure(("role", index), UpstreamError(ROLE_NOT_FOUND))
    assert len(gate) == 5
    gate.check(("role", 0))
    gate.check(("other", 0))
    with pytest.raises(UpstreamError):
        gate.check(("role", 19))


async def test_an_attempt_cut_by_its_timeout_is_an_upstream_timeout(
    clock: FakeClock, sleep: FakeSleep
) -> None:
    """An attempt still running when its (cut) timeout ends is abandoned as UpstreamTimeout."""

    async def never_answers(request: str) -> str:
        await asyncio.Event().wait()
        return "unreachable"

    retry = _policy(clock, sleep, attempt_timeout_seconds=0.05, max_attempts=1)
    call = with_resilience(never_answers, retry=retry, budget=None, gate=None, key=lambda r: r)
    with pytest.raises(UpstreamTimeout) as caught:
        await call("req")
    assert caught.value.context["timeout_seconds"] == 0.05
    assert caught.value.retry_after_seconds == 1


async def test_a_budget_wait_cut_by_the_deadline_is_a_budget_refusal(
    clock: FakeClock, sleep: FakeSleep
) -> None:
    """No STS slot before the attempt's time runs out: a non-retryable 503, STS never called."""
    budget = StsBudget(1.0, 1.0, clock, max_wait_seconds=30.0)  # waits with asyncio.sleep
    fetch = Script("creds")
    retry = _policy(clock, sleep, attempt_timeout_seconds=0.05, max_attempts=3)
    call = with_resilience(fetch, retry=retry, budget=budget, gate=None, key=lambda r: r)
    assert await call("first") == "creds"  # takes the one slot
    with pytest.raises(UpstreamThrottled, match="no slot before the deadline") as caught:
        await call("second")
    assert caught.value.retryable is False
    assert fetch.calls == ["first"]


async def test_sts_failing_every_other_call_fails_no_request(
    clock: FakeClock, sleep: FakeSleep
) -> None:
    """With every other STS call a 500, retries make 12 of 12 requests succeed; no gate opens."""
    gate = FailureGate(threshold=1, clock=clock)
    fetch = Script(*[UpstreamUnavailable(sts_status=500), "creds"] * 12)
    call = with_resilience(
        fetch, retry=_policy(clock, sleep), budget=None, gate=gate, key=lambda req: req
    )
    results = [await call("scope") for _ in range(12)]
    assert results == ["creds"] * 12
    assert len(fetch.calls) == 24
    assert len(gate) == 0


async def test_each_attempt_goes_through_the_budget(clock: FakeClock, sleep: FakeSleep) -> None:
    """A retried call spends one budget slot per attempt and waits for it when none is free."""
    budget = StsBudget(1.0, 1.0, clock, sleep=sleep)
    fetch = Script(UpstreamTimeout(), "creds")
    call = with_resilience(
        fetch, retry=_policy(clock, sleep, 0.0), budget=budget, gate=None, key=lambda req: req
    )
    assert await call("req") == "creds"
    assert sleep.delays == pytest.approx([0.0, 1.0])
    assert budget.available() == 0.0


async def test_budget_refusal_is_neither_retried_nor_held_against_the_key(
    clock: FakeClock, sleep: FakeSleep
) -> None:
    """An exhausted budget fails fast with 503 and leaves the failure gate closed."""
    budget = StsBudget(1.0, 1.0, clock, max_wait_seconds=0.0, sleep=sleep)
    gate = FailureGate(threshold=1, clock=clock)
    fetch = Script("creds")
    call = with_resilience(
        fetch, retry=_policy(clock, sleep), budget=budget, gate=gate, key=lambda req: req
    )
    assert await call("req") == "creds"
    with pytest.raises(UpstreamThrottled, match="STS call budget exhausted"):
        await call("req")
    assert len(fetch.calls) == 1
    assert sleep.delays == []
    clock.advance(1.0)
    assert await call("req") == "creds"


async def test_gate_stops_calls_for_a_failing_key(clock: FakeClock, sleep: FakeSleep) -> None:
    """Repeated non-retryable failures stop STS calls for that key while the gate is open."""
    gate = FailureGate(threshold=2, open_seconds=30.0, clock=clock)
    fetch = Script(UpstreamError(ROLE_NOT_FOUND), UpstreamError(ROLE_NOT_FOUND), "creds")
    call = with_resilience(
        fetch, retry=_policy(clock, sleep), budget=None, gate=gate, key=lambda req: req
    )
    for _ in range(3):
        with pytest.raises(UpstreamError, match=r"EntityNotExist\.Role"):
            await call("bad-role")
    assert fetch.calls == ["bad-role", "bad-role"]
    assert sleep.delays == []
    clock.advance(30.0)
    assert await call("bad-role") == "creds"
    assert len(gate) == 0


async def test_gate_is_keyed_by_the_key_function(clock: FakeClock, sleep: FakeSleep) -> None:
    """A key's open gate does not block requests that map to another key."""
    gate = FailureGate(threshold=1, clock=clock)
    bad = Script(UpstreamError(ROLE_NOT_FOUND))
    call = with_resilience(
        bad, retry=_policy(clock, sleep), budget=None, gate=gate, key=lambda req: req[:3]
    )
    with pytest.raises(UpstreamError):
        await call("bad:1")
    bad.outcomes = ["creds"]
    with pytest.raises(UpstreamError):
        await call("bad:2")
    assert await call("good") == "creds"
    assert bad.calls == ["bad:1", "good"]


async def test_composition_without_budget_or_gate(clock: FakeClock, sleep: FakeSleep) -> None:
    """With no budget and no gate, only the retry policy wraps the fetch."""
    fetch = Script(UpstreamThrottled(retry_after=1), "creds")
    call = with_resilience(
        fetch, retry=_policy(clock, sleep), budget=None, gate=None, key=lambda req: req
    )
    assert await call("req") == "creds"
    assert sleep.delays == [1.0]
