"""The audit writer: bounded, one write per batch, an outcome per batch, safe descriptor swaps."""

from __future__ import annotations

import asyncio
import contextlib
import os
from pathlib import Path

from broker.audit_writer import AuditWriter, Entry


def _writer(path: Path, max_buffer_bytes: int = 1 << 20) -> AuditWriter:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    return AuditWriter(fd, owns_fd=True, max_buffer_bytes=max_buffer_bytes, fsync=False)


def test_writer_refuses_what_does_not_fit_in_its_buffer(tmp_path: Path) -> None:
    """Past max_buffer_bytes, records are refused (and returned), never queued without bound."""
    writer = _writer(tmp_path / "audit.jsonl", max_buffer_bytes=100)
    entries = [(b"x" * 40 + b"\n", "credentials_issued", None) for _ in range(4)]
    settled: list[int] = []
    refused = writer.submit(entries, lambda done, error: settled.append(len(done)))
    assert refused == entries[2:]
    writer.close()
    assert (tmp_path / "audit.jsonl").read_bytes() == entries[0][0] * 2
    assert settled == [2]
    assert writer.submit(entries[:1], lambda done, error: None) == entries[:1]  # closed


async def test_one_write_reports_its_outcome_to_every_batch_in_it(tmp_path: Path) -> None:
    """Batches queued together are written together, and each hears the same outcome."""
    writer = _writer(tmp_path / "audit.jsonl")
    loop = asyncio.get_running_loop()
    outcomes: asyncio.Queue[tuple[int, str | None]] = asyncio.Queue()

    def settle(done: object, error: str | None) -> None:
        loop.call_soon_threadsafe(outcomes.put_nowait, (len(done), error))  # type: ignore[arg-type]

    for index in range(3):
        assert writer.submit([(b"line %d\n" % index, "credentials_issued", None)], settle) == []
    results = [await outcomes.get() for _ in range(3)]
    writer.close()
    assert results == [(1, None)] * 3
    assert (tmp_path / "audit.jsonl").read_bytes() == b"line 0\nline 1\nline 2\n"


async def test_a_failing_sink_reports_the_error_by_name(tmp_path: Path) -> None:
    """/dev/full: the batch's outcome is ENOSPC, for the metrics and the 503."""
    writer = AuditWriter(
        os.open("/dev/full", os.O_WRONLY), owns_fd=True, max_buffer_bytes=1 << 20, fsync=True
    )
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[str | None] = loop.create_future()
    entries: list[Entry] = [(b"x\n", "credentials_issued", None)]
    writer.submit(entries, lambda _, error: loop.call_soon_threadsafe(outcome.set_result, error))
    assert await outcome == "ENOSPC"
    writer.close()


def test_replace_fd_switches_files_between_writes(tmp_path: Path) -> None:
    """After replace_fd, the next batch goes to the new descriptor and the old one is closed."""
    writer = _writer(tmp_path / "old.jsonl")
    writer.replace_fd(os.open(tmp_path / "new.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND))
    assert str(tmp_path / "old.jsonl") not in _open_files()  # closed at the swap
    assert writer.write_now([(b"after\n", "credentials_issued", None)]) is None
    writer.close()
    assert (tmp_path / "new.jsonl").read_bytes() == b"after\n"
    assert (tmp_path / "old.jsonl").read_bytes() == b""
    assert str(tmp_path / "new.jsonl") not in _open_files()  # and the new one at close


def _open_files() -> set[str]:
    """What this process's descriptors point at."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor is gone by now
            found.add(os.readlink(f"/proc/self/fd/{name}"))
    return found
