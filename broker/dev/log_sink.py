"""A misbehaving log reader for dev mode and tests: it stalls, or reads slowly.

Put it at the reading end of the broker's stderr to see that a blocked or slow
log stream never stops the broker (lines are dropped and counted instead)::

    sts-broker dev 2> >(python -m broker.dev.log_sink --stall)
    sts-broker serve --config config/broker.yaml 2>&1 >/dev/null \\
        | python -m broker.dev.log_sink --bytes-per-second 200

``--stall`` reads nothing, so the pipe fills and every write to it blocks,
until SIGUSR1 (then it copies everything to stdout at full speed); if the
writer closes its end first, it exits without reading.  It says on stderr
when it is ready for SIGUSR1.  ``--bytes-per-second N`` copies at most N bytes a
second.  Watch ``broker_log_lines_dropped_total`` on ``/metrics`` meanwhile.
"""

from __future__ import annotations

import argparse
import os
import select
import signal
import sys
import threading
import time
from collections.abc import Sequence

__all__ = ["main"]

_CHUNK_BYTES = 65536
_POLL_MILLISECONDS = 500


def main(argv: Sequence[str] | None = None) -> int:
    """Run the sink on stdin → stdout until stdin ends; 0 on a normal end."""
    args = _parser().parse_args(argv)
    stdin, stdout = sys.stdin.fileno(), sys.stdout.fileno()
    if args.stall:
        released = threading.Event()
        signal.signal(signal.SIGUSR1, lambda *_: released.set())
        print(f"log_sink: stalled; kill -USR1 {os.getpid()} releases", file=sys.stderr, flush=True)
        if not _stall(stdin, released):
            return 0
    _copy(stdin, stdout, args.bytes_per_second)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m broker.dev.log_sink",
        description="Read stdin like a stuck or slow log collector, copying it to stdout.",
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument(
        "--stall",
        action="store_true",
        help="read nothing until SIGUSR1, then copy at full speed",
    )
    mode.add_argument(
        "--bytes-per-second",
        type=int,
        metavar="N",
        help="copy at most N bytes a second",
    )
    return parser


def _stall(stdin: int, released: threading.Event) -> bool:
    """Read nothing until ``released`` (True) or until the writer hangs up (False)."""
    poller = select.poll()
    poller.register(stdin, select.POLLHUP)
    while not released.is_set():
        events = [flags for _, flags in poller.poll(_POLL_MILLISECONDS)]
        if not released.is_set() and any(flags & select.POLLHUP for flags in events):
            return False
    return True


def _copy(stdin: int, stdout: int, bytes_per_second: int | None) -> None:
    """stdin → stdout to its end, at most ``bytes_per_second`` (``None``: at full speed)."""
    chunk = (
        _CHUNK_BYTES if bytes_per_second is None else max(1, min(_CHUNK_BYTES, bytes_per_second))
    )
    started = time.monotonic()
    copied = 0
    while data := os.read(stdin, chunk):
        _write_all(stdout, data)
        copied += len(data)
        if bytes_per_second is not None:
            time.sleep(max(0.0, started + copied / bytes_per_second - time.monotonic()))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


if __name__ == "__main__":
    raise SystemExit(main())
