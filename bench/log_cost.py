"""What a hot log line costs: structlog's chain against the direct renderer, in-process.

Run as ``.venv/bin/python bench/log_cost.py [--lines N] [--rounds R]``.

The two lines every cached ``GET /v1/credentials/{policy}`` writes,
``request_finished`` and ``credentials_issued``, with the fields and the
bound context (request_id, caller, policy) of a real request, rendered as JSON
into a stream that discards them: once through structlog's generic chain
(``log.info``, the way every other event goes) and once through
``broker.hot_log.emit``.  Process CPU µs per line, the best of R rounds of
N lines, and the ratio.  The level filter, key redaction and the rendered
line's scrub run in both.  Nothing here is a test: figures depend on the machine.
"""

from __future__ import annotations

import argparse
import io
import time
import timeit
from collections.abc import Callable
from typing import Any

import structlog

from broker import hot_log
from broker.logs import configure_logging

CONTEXT = {
    "request_id": "df4d62f93b4a4450a3a8f6b1c2270a95",
    "caller": "svc-reports",
    "policy": "reports-read",
}
EVENTS: dict[str, dict[str, Any]] = {
    "request_finished": {
        "method": "GET",
        "path": "/v1/credentials/reports-read",
        "status": 200,
        "duration_ms": 0.412,
        "error_code": None,
    },
    "credentials_issued": {
        "bucket": "acme-reports",
        "prefix": "reports/",
        "grants": 1,
        "narrowed": False,
        "policy_digest": "0123456789abcdef",
        "access_key_id": "STS.NUgYrLnoC37mZZCNnAbez2Ksn4",
        "expiration": "2026-12-02T07:20:01Z",
        "expires_in": 3599,
        "cache": "hit",
    },
}


class _Discard(io.TextIOBase):
    """A stream that keeps nothing (and is not a TTY: the JSON renderer is chosen)."""

    def write(self, text: str) -> int:
        return len(text)


def _per_line(call: Callable[[], None], lines: int, rounds: int) -> float:
    """µs of process CPU time per call: the best of ``rounds`` rounds of ``lines`` calls.

    CPU time and the best round: other processes on a busy machine add to
    the wall time of some rounds, not to the work a line takes.
    """
    times = timeit.repeat(call, number=lines, repeat=rounds, timer=time.process_time)
    return min(times) / lines * 1e6


def _compare(event: str, fields: dict[str, Any], lines: int, rounds: int) -> tuple[float, float]:
    """µs per line through structlog's chain, then through ``hot_log.emit``."""
    log = structlog.get_logger("broker.bench")
    chain = _per_line(lambda: log.info(event, **fields), lines, rounds)
    fast = _per_line(lambda: hot_log.emit(event, dict(fields)), lines, rounds)
    return chain, fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    configure_logging("json", "info", stream=_Discard())
    structlog.contextvars.bind_contextvars(**CONTEXT)
    print(f"{'event':<20} {'chain µs':>9} {'fast µs':>9} {'ratio':>6}")
    for event, fields in EVENTS.items():
        chain, fast = _compare(event, fields, args.lines, args.rounds)
        print(f"{event:<20} {chain:9.2f} {fast:9.2f} {chain / fast:5.1f}x")


if __name__ == "__main__":
    main()
