"""Child processes of the benchmark: own process groups, bounded start-up waits, sure cleanup.

Every child starts in a new session (its own process group), so ``stop()``
reaches grandchildren too (``serve --workers N`` spawns N workers).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["Child", "free_port", "get_body", "get_json", "start_child"]


@dataclass
class Child:
    """One started process (and its process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        """The process id (and process group id)."""
        return self.popen.pid

    def read_line(self, timeout_seconds: float = 20.0) -> str:
        """The next line of the child's stdout, waiting at most ``timeout_seconds``."""
        stream = self.popen.stdout
        if stream is None:
            raise RuntimeError(f"{self.name}: stdout is not a pipe")
        ready, _, _ = select.select([stream], [], [], timeout_seconds)
        line = stream.readline().decode().strip() if ready else ""
        if not line:
            problem = f"{self.name}: printed nothing within {timeout_seconds}s"
            raise RuntimeError(problem + self._tail())
        return line

    def wait_http_ok(self, url: str, timeout_seconds: float = 30.0) -> None:
        """Poll ``url`` until it answers 200; fail early if the child dies."""
        deadline = time.monotonic() + timeout_seconds
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.popen.returncode}{self._tail()}")
            with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1.0) as reply:
                if reply.status == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"{self.name}: {url} not ready within {timeout_seconds}s{self._tail()}")

    def stop(self, timeout_seconds: float = 10.0) -> None:
        """SIGTERM the group, wait, then SIGKILL whatever is left of it."""
        if self.popen.poll() is None:
            _signal_group(self.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout_seconds)
        _signal_group(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5.0)
        if self.popen.stdout is not None:
            self.popen.stdout.close()

    def _tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        lines = self.log_path.read_text(errors="replace").splitlines()[-15:]
        return "\n  last log lines:\n  " + "\n  ".join(lines)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def start_child(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    log_path: Path | None = None,
    stdout_pipe: bool = True,
) -> Child:
    """Start ``argv`` in its own session; stderr to ``log_path`` (else /dev/null)."""
    stderr: IO[bytes] | int = subprocess.DEVNULL
    if log_path is not None:
        stderr = log_path.open("wb")
    try:
        popen = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else subprocess.DEVNULL,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            start_new_session=True,
        )
    finally:
        if not isinstance(stderr, int):
            stderr.close()  # the child holds its own descriptor
    return Child(name, popen, log_path)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get_json(url: str, timeout_seconds: float = 5.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout_seconds) as reply:
        return json.loads(reply.read())


def get_body(url: str, headers: Mapping[str, str], data: bytes | None = None) -> bytes:
    """The body of one GET (or POST, with ``data``) that must answer 200."""
    request = urllib.request.Request(url, data=data, headers=dict(headers))
    try:
        with urllib.request.urlopen(request, timeout=10.0) as reply:
            return bytes(reply.read())
    except urllib.error.HTTPError as err:
        raise RuntimeError(f"{url}: HTTP {err.code}: {err.read()[:300]!r}") from err
