"""Drive load with Debian's ``wrk`` in its own process and parse what it prints."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["WrkResult", "parse_wrk", "run_wrk", "write_post_script", "wrk_version"]

_UNIT_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}
_PERCENTILE = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", re.MULTILINE)
_RPS = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_TOTAL = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET_ERRORS = re.compile(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


@dataclass(frozen=True)
class WrkResult:
    """One wrk run: throughput, median and 99th percentile latency, failures."""

    requests_per_second: float
    p50_ms: float
    p99_ms: float
    requests: int
    non_2xx: int
    socket_errors: int

    @property
    def clean(self) -> bool:
        """True when every response was 2xx/3xx and no socket failed."""
        return self.non_2xx == 0 and self.socket_errors == 0

    def summary(self) -> str:
        """``12345 req/s, p50 3.21 ms, p99 7.65 ms`` (+ failures, if any)."""
        text = (
            f"{self.requests_per_second:,.0f} req/s, "
            f"p50 {self.p50_ms:.2f} ms, p99 {self.p99_ms:.2f} ms"
        )
        if not self.clean:
            text += f" [non-2xx {self.non_2xx}, socket errors {self.socket_errors}]"
        return text


def parse_wrk(output: str) -> WrkResult:
    """Parse ``wrk --latency`` output; ValueError if a figure is missing."""
    rps = _RPS.search(output)
    total = _TOTAL.search(output)
    percentiles = {m[1]: float(m[2]) * _UNIT_MS[m[3]] for m in _PERCENTILE.finditer(output)}
    if rps is None or total is None or set(percentiles) != {"50", "99"}:
        raise ValueError(f"unexpected wrk output:\n{output}")
    non_2xx = _NON_2XX.search(output)
    errors = _SOCKET_ERRORS.search(output)
    return WrkResult(
        requests_per_second=float(rps[1]),
        p50_ms=percentiles["50"],
        p99_ms=percentiles["99"],
        requests=int(total[1]),
        non_2xx=int(non_2xx[1]) if non_2xx else 0,
        socket_errors=sum(int(n) for n in errors.groups()) if errors else 0,
    )


def run_wrk(
    url: str,
    *,
    duration_seconds: int,
    connections: int = 50,
    headers: Sequence[str] = (),
    script: Path | None = None,
) -> WrkResult:
    """``wrk -t1 -c<connections> -d<duration>s --latency`` against ``url`` (127.0.0.1 only)."""
    if not url.startswith("http://127.0.0.1:"):
        raise ValueError(f"refusing to load anything but 127.0.0.1: {url}")
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{duration_seconds}s", "--latency"]
    argv += ["--timeout", "5s"]
    for header in headers:
        argv += ["-H", header]
    if script is not None:
        argv += ["-s", str(script)]
    argv.append(url)
    done = subprocess.run(
        argv, capture_output=True, text=True, check=True, timeout=duration_seconds + 30
    )
    return parse_wrk(done.stdout)


def wrk_version() -> str:
    """wrk's own version line, e.g. ``wrk debian/4.1.0-3+b2 [epoll]``."""
    done = subprocess.run(["wrk", "-v"], capture_output=True, text=True, timeout=10, check=False)
    first = (done.stdout or done.stderr).strip().splitlines()
    return first[0].split(" Copyright")[0] if first else "unknown"


def write_post_script(path: Path, body: str, authorization: str) -> Path:
    """A wrk Lua script that POSTs ``body`` as JSON with an Authorization header."""
    if "]]" in body or "\n" in authorization or '"' in authorization:
        raise ValueError("body or header would break the Lua script")
    path.write_text(
        'wrk.method = "POST"\n'
        f"wrk.body = [[{body}]]\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
        f'wrk.headers["Authorization"] = "{authorization}"\n',
        encoding="utf-8",
    )
    return path
