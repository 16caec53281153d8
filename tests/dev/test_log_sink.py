"""The dev log sink (broker/dev/log_sink.py): a stalled reader that SIGUSR1 releases, a slow one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

SINK = [sys.executable, "-m", "broker.dev.log_sink"]
WAIT_SECONDS = 20.0


def _fill(fd: int) -> int:
    """Write into ``fd`` until it would block; how many bytes went in."""
    os.set_blocking(fd, False)
    written = 0
    try:
        while True:
            written += os.write(fd, b"x" * 4096)
    except BlockingIOError:
        return written
    finally:
        os.set_blocking(fd, True)


def test_stalled_sink_reads_nothing_until_sigusr1_then_copies_everything() -> None:
    """--stall: the pipe fills (writes would block); after SIGUSR1 every byte comes out."""
    sink = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [*SINK, "--stall"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert sink.stdin is not None
    assert sink.stdout is not None
    assert sink.stderr is not None
    try:
        assert b"kill -USR1" in sink.stderr.readline()  # the handler is installed
        written = _fill(sink.stdin.fileno())
        assert _fill(sink.stdin.fileno()) == 0  # still nothing read
        sink.send_signal(signal.SIGUSR1)
        sink.stdin.close()
        out = sink.stdout.read()
        assert sink.wait(WAIT_SECONDS) == 0
    finally:
        if sink.poll() is None:
            sink.kill()
            sink.wait()
        sink.stdout.close()
        sink.stderr.close()
    assert len(out) == written


def test_slow_sink_copies_everything_at_its_rate() -> None:
    """--bytes-per-second: all of stdin reaches stdout, unchanged."""
    data = b"".join(b'{"event":"request_finished","n":%d}\n' % n for n in range(300))
    done = subprocess.run(  # noqa: S603 - our own interpreter and module
        [*SINK, "--bytes-per-second", "100000"],
        input=data,
        capture_output=True,
        timeout=WAIT_SECONDS,
        check=True,
    )
    assert done.stdout == data


def test_stalled_sink_exits_when_the_writer_hangs_up() -> None:
    """--stall with nobody writing any more: it exits 0 instead of waiting forever."""
    sink = subprocess.Popen(  # noqa: S603 - our own interpreter and module
        [*SINK, "--stall"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert sink.stdin is not None
    assert sink.stderr is not None
    reader = threading.Thread(target=sink.stderr.read, daemon=True)
    reader.start()
    sink.stdin.write(b"a line\n")
    sink.stdin.close()
    assert sink.wait(WAIT_SECONDS) == 0
    reader.join(WAIT_SECONDS)
    assert sink.stdout is not None
    sink.stdout.close()
    sink.stderr.close()
