"""Retries with full-jitter backoff, one deadline, and a per-key failure gate around the STS fetch.

Which failures are worth another attempt (``BrokerError.retryable``; ``sts.py``
classifies STS's answers by Alibaba's own rules):

* ``UpstreamThrottled`` (every ``Throttling*`` code), ``UpstreamUnavailable``
  (5xx, unreachable, no usable reply) and ``UpstreamTimeout`` are retryable by
  class: transient, and never held against the key.
* ``retryable=False`` forbids a retry whatever the class: the STS call budget
  marks its own refusals that way, as retrying our own load shedding would only
  lengthen the queue.  Such a refusal is still transient (not the key's fault).
* Everything else (a 4xx answer: unknown role, policy grammar, signature,
  NoPermission; credentials the broker refuses) is the key's own fault: raised
  at once, and counted by ``FailureGate``, which stops calling STS for that key
  for a while after repeated failures.

Time: one deadline (``sts.retry.deadline_seconds``) covers every attempt, every
wait for the STS budget and every backoff.  Each attempt may take
``min(sts.timeout_seconds, time left)``, so the last one is cut to what is
left; an attempt that would have less than ``min_attempt_seconds`` is not
started, and the last error is raised instead.  The final error says how many
attempts were made and with which timeouts (``attempts``, ``attempt_timeouts``
in its context, for the log).
"""

from __future__ import annotations

import asyncio
import copy
import random as _random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

import structlog

from broker.credentials.budget import StsBudget
from broker.errors import (
    BrokerError,
    UpstreamError,
    UpstreamThrottled,
    UpstreamTimeout,
    UpstreamUnavailable,
)
from broker.models import Clock

__all__ = ["FailureGate", "RetryPolicy", "is_retryable", "is_transient", "with_resilience"]

log = structlog.get_logger("broker.credentials.resilience")

T = TypeVar("T")
K = TypeVar("K")

Sleep = Callable[[float], Awaitable[None]]

_TRANSIENT = (UpstreamThrottled, UpstreamUnavailable, UpstreamTimeout)


def is_transient(err: BaseException) -> bool:
    """True when ``err`` says nothing about the request itself (STS busy, slow, unreachable)."""
    if not isinstance(err, UpstreamError):
        return False
    return isinstance(err, _TRANSIENT) or err.retryable


def is_retryable(err: BaseException) -> bool:
    """True when another attempt may succeed: an STS failure whose ``retryable`` is true."""
    return isinstance(err, UpstreamError) and err.retryable


class RetryPolicy:
    """Exponential backoff with full jitter, bounded by attempts and an overall deadline.

    ``run(attempt)`` calls ``attempt(timeout_seconds)``: the attempt must end
    within that many seconds, ``min(attempt_timeout_seconds, time left)``.
    Before retry ``n`` (0-based) it sleeps ``random() * min(max_delay, base * 2**n)``,
    or, after a throttled answer, its ``retry_after_seconds`` if that is
    longer.  It never sleeps past the deadline, nor starts an attempt with
    less than ``min_attempt_seconds`` left: the last error is raised instead.
    """

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        base_delay_seconds: float = 0.1,
        max_delay_seconds: float = 2.0,
        deadline_seconds: float = 8.0,
        attempt_timeout_seconds: float | None = None,
        min_attempt_seconds: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
        sleep: Sleep = asyncio.sleep,
        random: Callable[[], float] = _random.random,
    ) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.max_attempts = max_attempts
        self.base_delay_seconds = base_delay_seconds
        self.max_delay_seconds = max_delay_seconds
        self.deadline_seconds = deadline_seconds
        self.attempt_timeout_seconds = attempt_timeout_seconds or deadline_seconds
        self.min_attempt_seconds = min(min_attempt_seconds, deadline_seconds)
        self._clock = clock
        self._sleep = sleep
        self._random = random

    async def run(self, attempt: Callable[[float], Awaitable[T]]) -> T:
        """Await ``attempt(timeout)`` until it succeeds or a failure may not be retried."""
        deadline = self._clock() + self.deadline_seconds
        timeouts: list[float] = []
        while True:
            timeouts.append(min(self.attempt_timeout_seconds, deadline - self._clock()))
            try:
                return await attempt(timeouts[-1])
            except BrokerError as err:
                delay = self._next_delay(len(timeouts) - 1, err, deadline)
                if delay is None:
                    err.context.update(attempts=len(timeouts), attempt_timeouts=_rounded(timeouts))
                    raise
                log.info(
                    "retry_scheduled",
                    retry=len(timeouts),
                    error_code=err.code,
                    delay_seconds=round(delay, 3),
                )
            await self._sleep(delay)

    def backoff(self, retry: int) -> float:
        """The full-jitter delay before retry ``retry`` (0-based)."""
        cap = min(self.max_delay_seconds, self.base_delay_seconds * 2.0**retry)
        return self._random() * cap

    def _next_delay(self, retry: int, err: BrokerError, deadline: float) -> float | None:
        """The sleep before the next attempt, or None when there must be none."""
        if not is_retryable(err) or retry + 1 >= self.max_attempts:
            return None
        delay = self.backoff(retry)
        if isinstance(err, UpstreamThrottled):  # STS's limits are per second: wait as told
            delay = max(delay, float(err.retry_after_seconds or 0))
        if self._clock() + delay + self.min_attempt_seconds > deadline:
            return None
        return delay


def _rounded(timeouts: list[float]) -> list[float]:
    return [round(seconds, 3) for seconds in timeouts]


@dataclass(slots=True)
class _GateState:
    failures: int = 0
    open_until: float = 0.0
    error: BrokerError | None = None


class FailureGate:
    """Stops calling STS for a key after ``threshold`` consecutive non-transient failures.

    While open, ``check`` raises a fresh copy of the last error (same class,
    code and message) for ``open_seconds``.  Afterwards one call goes through:
    a success closes the gate, another failure reopens it at once.  At most
    ``max_keys`` keys are remembered; the least recently failed are dropped.
    """

    def __init__(
        self,
        *,
        threshold: int = 3,
        open_seconds: float = 30.0,
        clock: Clock,
        max_keys: int = 10_000,
    ) -> None:
        if threshold < 1 or max_keys < 1:
            raise ValueError("threshold and max_keys must be at least 1")
        self._threshold = threshold
        self._open_seconds = open_seconds
        self._clock = clock
        self._max_keys = max_keys
        self._states: OrderedDict[Hashable, _GateState] = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def check(self, key: Hashable) -> None:
        """Raise the remembered error while the gate for ``key`` is open."""
        state = self._states.get(key)
        if state is None or state.error is None or self._clock() >= state.open_until:
            return
        raise _replay(state.error)

    def record_failure(self, key: Hashable, error: BrokerError) -> None:
        """Count a non-transient ``error`` against ``key``; open the gate at the threshold."""
        if is_transient(error):
            return
        state = self._states.pop(key, None) or _GateState()
        self._states[key] = state
        state.failures += 1
        state.error = error
        if state.failures >= self._threshold:
            state.open_until = self._clock() + self._open_seconds
            log.warning("failure_gate_opened", error_code=error.code, failures=state.failures)
        while len(self._states) > self._max_keys:
            self._states.popitem(last=False)

    def record_success(self, key: Hashable) -> None:
        """Forget every failure of ``key``."""
        self._states.pop(key, None)


def _replay(error: BrokerError) -> BrokerError:
    """A new instance of ``error``: same class and message, no traceback, tagged for the log."""
    clone = copy.copy(error)
    clone.context = {**error.context, "failure_gate": "open"}
    return clone


def with_resilience(
    fetch: Callable[[K], Awaitable[T]],
    *,
    retry: RetryPolicy,
    budget: StsBudget | None,
    gate: FailureGate | None,
    key: Callable[[K], Hashable],
) -> Callable[[K], Awaitable[T]]:
    """``fetch`` behind the gate, each attempt inside the budget, attempts under ``retry``."""

    async def resilient_fetch(request: K) -> T:
        gate_key = key(request)
        if gate is not None:
            gate.check(gate_key)
        try:
            result = await retry.run(partial(_attempt, fetch, request, budget))
        except BrokerError as err:
            if gate is not None:
                gate.record_failure(gate_key, err)
            raise
        if gate is not None:
            gate.record_success(gate_key)
        return result

    return resilient_fetch


async def _attempt(
    fetch: Callable[[K], Awaitable[T]], request: K, budget: StsBudget | None, seconds: float
) -> T:
    """One attempt: a budget slot, then ``fetch``, both within ``seconds``."""
    called = False
    try:
        async with asyncio.timeout(seconds):
            if budget is not None:
                await budget.acquire()
            called = True
            return await fetch(request)
    except TimeoutError as err:
        if not called:  # the deadline ran out while queueing for the budget
            raise UpstreamThrottled(
                "STS call budget: no slot before the deadline", retryable=False
            ) from err
        raise UpstreamTimeout(timeout_seconds=round(seconds, 3)) from err
