"""The API-key check alone, with 2 keys and with 1,000 configured: what the key count costs.

In-process and without HTTP, so the shared machine's noise cannot hide it:
``ApiKeyAuthenticator.authenticate`` for the LAST key of the list, interleaved
rounds, the best of each round (timeit's advice: the minimum is the figure
least disturbed by other processes), the median over the rounds.
"""

from __future__ import annotations

import secrets
import statistics
import timeit
from dataclasses import dataclass

from broker.auth import ApiKeyAuthenticator, hash_api_key

__all__ = ["KeyCountTiming", "measure"]


@dataclass(frozen=True)
class KeyCountTiming:
    """Microseconds per key check with ``few`` and with ``many`` keys configured."""

    few: int
    many: int
    few_us: float
    many_us: float


def _authenticator(count: int) -> tuple[ApiKeyAuthenticator, str]:
    keys = [secrets.token_urlsafe(24) for _ in range(count)]
    digests = {f"bench-k{index:04d}": hash_api_key(key) for index, key in enumerate(keys)}
    return ApiKeyAuthenticator(digests, {}), keys[-1]


def _best_us(authenticator: ApiKeyAuthenticator, key: str, number: int) -> float:
    seconds = min(timeit.repeat(lambda: authenticator.authenticate(key), number=number, repeat=3))
    return seconds / number * 1e6


def measure(rounds: int, few: int = 2, many: int = 1000) -> KeyCountTiming:
    """Interleaved rounds of the key check with ``few`` and ``many`` keys."""
    small, small_key = _authenticator(few)
    large, large_key = _authenticator(many)
    few_us, many_us = [], []
    for _ in range(rounds):
        few_us.append(_best_us(small, small_key, 2000))
        many_us.append(_best_us(large, large_key, 200))
    return KeyCountTiming(few, many, statistics.median(few_us), statistics.median(many_us))
