"""The log writer (broker/log_writer.py): a blocked log stream never blocks the broker.

A ``LogSink`` over a real pipe that nobody reads: writes return at once, lines
past the bound are dropped and counted, and a ``log_lines_dropped`` line (and
/metrics) tell once the stream drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, TextIO

import pytest
import structlog

from broker import log_writer
from broker.log_writer import LogSink, LoopBatchedLogger
from broker.logs import configure_logging
from broker.metrics import Metrics


class _Drain(threading.Thread):
    """Reads a pipe to its end, keeping what it read."""

    def __init__(self, read_fd: int) -> None:
        super().__init__(daemon=True)
        self.read_fd = read_fd
        self.chunks: list[bytes] = []
        self.seen = threading.Condition()

    def run(self) -> None:
        while chunk := os.read(self.read_fd, 65536):
            with self.seen:
                self.chunks.append(chunk)
                self.seen.notify_all()

    def wait_for(self, text: bytes, seconds: float = 20.0) -> bytes:
        """Everything read once ``text`` has been (bounded by ``seconds``)."""
        with self.seen:
            assert self.seen.wait_for(lambda: text in b"".join(self.chunks), seconds), text
            return b"".join(self.chunks)


@dataclass
class StalledPipe:
    """A full pipe: ``stream`` writes to it, nobody reads it until ``drain()``."""

    stream: TextIO
    read_fd: int
    sinks: list[LogSink] = field(default_factory=list)
    reader: _Drain | None = None

    def sink(self, **options: Any) -> LogSink:
        sink = LogSink(self.stream, **options)
        self.sinks.append(sink)
        return sink

    def drain(self) -> _Drain:
        """Start reading the pipe (the stalled stream flows again)."""
        if self.reader is None:
            self.reader = _Drain(self.read_fd)
            self.reader.start()
        return self.reader


def _fill_pipe(write_fd: int) -> None:
    """Write filler into the pipe until not one more byte fits."""
    os.set_blocking(write_fd, False)
    try:
        for size in (65536, 4096, 256, 16, 1):
            with contextlib.suppress(BlockingIOError):
                while True:
                    os.write(write_fd, b"#" * size)
    finally:
        os.set_blocking(write_fd, True)


@pytest.fixture
def stalled_pipe() -> Iterator[StalledPipe]:
    """A full pipe and its sinks; afterwards drained, every writer stopped, then closed."""
    read_fd, write_fd = os.pipe()
    _fill_pipe(write_fd)
    pipe = StalledPipe(open(write_fd, "w", encoding="utf-8"), read_fd)  # noqa: SIM115
    yield pipe
    reader = pipe.drain()  # unblock the writers so they can stop
    for sink in pipe.sinks:
        sink.close(timeout=20.0)
    pipe.stream.close()  # the reader sees the end of the pipe and stops
    reader.join(20.0)
    os.close(read_fd)


def _fill(sink: LogSink, line: str, limit: int = 100_000) -> int:
    """Write ``line`` until the sink drops one; how many were written (bounded by ``limit``)."""
    for count in range(limit):
        if not sink.write(line):
            return count
    pytest.fail(f"{limit} lines and none dropped: the sink never filled")


def test_sink_never_blocks_on_a_stalled_pipe_and_counts_what_it_drops(
    stalled_pipe: StalledPipe,
) -> None:
    """Writes return at once while nobody reads; past the bound lines are dropped and counted."""
    reports: list[int] = []
    reported = threading.Event()

    def on_recovered(count: int) -> None:
        reports.append(count)
        reported.set()

    sink = stalled_pipe.sink(max_buffer_bytes=16 * 1024, on_recovered=on_recovered)
    before = log_writer.lines_dropped()
    line = json.dumps({"event": "request_finished", "pad": "x" * 200}) + "\n"
    _fill(sink, line)
    for _ in range(99):
        assert sink.write(line) is False
    assert sink.buffered <= 16 * 1024
    assert log_writer.lines_dropped() - before >= 100
    stalled_pipe.drain()
    assert sink.flush(20.0)
    assert reported.wait(20.0)
    assert reports == [100]


def test_close_does_not_hang_on_a_stalled_pipe(stalled_pipe: StalledPipe) -> None:
    """Closing a sink whose stream is blocked gives up after its timeout (exit never hangs)."""
    sink = stalled_pipe.sink(max_buffer_bytes=16 * 1024)
    _fill(sink, "y" * 300 + "\n")
    assert sink.flush(0.05) is False
    sink.close(timeout=0.05)
    assert sink.write("after close\n") is False


def test_production_chain_reports_dropped_lines_in_the_log_and_metrics(
    stalled_pipe: StalledPipe,
) -> None:
    """The daemon's chain on a stalled stream: drops in /metrics, then logged once it drains."""
    sink = configure_logging(
        "json", "info", stream=stalled_pipe.stream, background=True, max_buffer_bytes=16384
    )
    assert sink is not None
    stalled_pipe.sinks.append(sink)
    try:
        log = structlog.get_logger("broker.test")
        before = log_writer.lines_dropped()
        for index in range(100_000):
            log.info("request_finished", index=index, pad="z" * 100)
            if log_writer.lines_dropped() > before:
                break
        for index in range(50):
            log.info("request_finished", index=index, pad="z" * 100)
        dropped = log_writer.lines_dropped() - before
        assert dropped >= 51
        metrics = Metrics().render().decode()
        assert f"broker_log_lines_dropped_total {float(log_writer.lines_dropped())}" in metrics
        text = stalled_pipe.drain().wait_for(b'"event":"log_lines_dropped"').decode()
    finally:
        structlog.reset_defaults()
        logging.getLogger().handlers.clear()
    notice = json.loads(next(line for line in text.splitlines() if "log_lines_dropped" in line))
    assert notice["dropped"] == dropped
    assert notice["level"] == "warning"


# --- LoopBatchedLogger: lines gathered on the loop, handed over together ------------


def _batched() -> tuple[io.StringIO, LogSink, LoopBatchedLogger]:
    output = io.StringIO()
    sink = LogSink(output)
    return output, sink, LoopBatchedLogger(sink)


def test_lines_of_one_loop_iteration_are_gathered_not_written_one_by_one() -> None:
    """Lines logged on the loop wait for the hand-over; FLUSH_LINES of them go at once."""
    output, sink, logger = _batched()

    async def log_lines() -> tuple[int, int]:
        logger.msg("first")
        logger.msg("second")
        queued_early = sink.buffered + len(output.getvalue())
        for index in range(LoopBatchedLogger.FLUSH_LINES - 2):
            logger.msg(f"line {index}")
        assert sink.flush(10.0)
        return queued_early, len(output.getvalue().splitlines())

    try:
        queued_early, written = asyncio.run(log_lines())
    finally:
        sink.close()
    assert queued_early == 0
    assert written == LoopBatchedLogger.FLUSH_LINES


def test_gathered_lines_are_handed_over_by_the_timer() -> None:
    """Without more lines, the gathered ones reach the stream soon after (bounded wait)."""
    output, sink, logger = _batched()

    async def log_and_wait() -> str:
        logger.msg("alone")
        deadline = asyncio.get_running_loop().time() + 10.0
        while "alone" not in output.getvalue() and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(LoopBatchedLogger.FLUSH_SECONDS)
            sink.flush(1.0)
        return output.getvalue()

    try:
        assert asyncio.run(log_and_wait()) == "alone\n"
    finally:
        sink.close()


def test_lines_of_an_ended_loop_come_before_later_ones_and_close_writes_the_rest() -> None:
    """A loop that ends first: its lines precede later lines; close() writes what is left."""
    output, sink, logger = _batched()

    async def log(line: str) -> None:
        logger.msg(line)

    asyncio.run(log("from the first loop"))
    logger.msg("from outside any loop")
    asyncio.run(log("from the last loop"))
    sink.close()
    assert output.getvalue().splitlines() == [
        "from the first loop",
        "from outside any loop",
        "from the last loop",
    ]
