"""Retries with full-jitter backoff and a per-key failure gate around the STS fetch.

Which failures are worth another attempt (``BrokerError.retryable``):

* ``UpstreamThrottled``, ``UpstreamUnavailable`` and ``UpstreamTimeout`` are
  retryable by class: transient, and never held against the key.
* An ``UpstreamError`` raised with ``retryable=True`` (a transport failure:
  connection reset, unreadable reply) is transient too.
* ``retryable=False`` forbids a retry whatever the class: the STS call budget
  marks its own refusals that way, as retrying our own load shedding would only
  lengthen the queue.  Such a refusal is still transient (not the key's fault).
* Everything else (unknown role, policy grammar, signature, AccessDenied) is
  the key's own fault: raised at once, and counted by ``FailureGate``, which
  stops calling STS for that key for a while after repeated failures.
"""

from __future__ import annotations

import asyncio
import copy
import random as _random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
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

    Before retry ``n`` (0-based) it sleeps ``random() * min(max_delay, base * 2**n)``,
    or the error's ``retry_after_seconds`` if that is longer.  It never sleeps
    past the deadline: when the next delay would end after it, the last error
    is raised instead.  (Each attempt is bounded by STS's own timeout.)
    """

    def __init__(
        self,
        *,
        max_attempts: int = 3,
        base_delay_seconds: float = 0.1,
        max_delay_seconds: float = 2.0,
        deadline_seconds: float = 8.0,
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
        self._clock = clock
        self._sleep = sleep
        self._random = random

    async def run(self, attempt: Callable[[], Awaitable[T]]) -> T:
        """Await ``attempt()`` until it succeeds or a failure may not be retried."""
        deadline = self._clock() + self.deadline_seconds
        retry = 0
        while True:
            try:
                return await attempt()
            except BrokerError as err:
                delay = self._next_delay(retry, err, deadline)
                if delay is None:
                    raise
                log.info(
                    "retry_scheduled",
                    retry=retry + 1,
                    error_code=err.code,
                    delay_seconds=round(delay, 3),
                )
            await self._sleep(delay)
            retry += 1

    def backoff(self, retry: int) -> float:
        """The full-jitter delay before retry ``retry`` (0-based)."""
        cap = min(self.max_delay_seconds, self.base_delay_seconds * 2.0**retry)
        return self._random() * cap

    def _next_delay(self, retry: int, err: BrokerError, deadline: float) -> float | None:
        if not is_retryable(err) or retry + 1 >= self.max_attempts:
            return None
        delay = max(self.backoff(retry), float(err.retry_after_seconds or 0))
        if self._clock() + delay > deadline:
            return None
        return delay


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
            result = await retry.run(lambda: _budgeted(fetch, request, budget))
        except BrokerError as err:
            if gate is not None:
                gate.record_failure(gate_key, err)
            raise
        if gate is not None:
            gate.record_success(gate_key)
        return result

    return resilient_fetch


async def _budgeted(fetch: Callable[[K], Awaitable[T]], request: K, budget: StsBudget | None) -> T:
    if budget is not None:
        await budget.acquire()
    return await fetch(request)
