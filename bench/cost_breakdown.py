"""Where a cached ``GET /v1/credentials`` spends its CPU: the broker with parts stubbed out.

Run as ``python bench/cost_breakdown.py [--seconds 4] [--rounds 2]``.  Each
variant (``bench/broker_variant.py``) and the hello-world baseline serve
``wrk -t1 -c50`` in turn; the figure is CPU time of the serving process
(all threads, from /proc) per request, so it does not depend on how much of
the 2 cores wrk happened to leave.  Differences between variants are what
the stubbed part costs: ``bare`` is aiohttp and the connection handling,
``const`` adds the ``request_context`` middleware, ``full`` adds
authentication, the use case, the audit record and the reply.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import stack as bench_stack
from procs import Child

VARIANTS = tuple(
    os.environ.get("VARIANTS", "bare,const,const-no-log,no-log,no-lane,full").split(",")
)
_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_seconds(pid: int) -> float:
    """User + system time of every thread of ``pid``."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        fields = Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / _TICKS


def _wrk(url: str, key: str, seconds: int) -> int:
    argv = ["wrk", "-t1", "-c50", f"-d{seconds}s", "-H", f"Authorization: Bearer {key}", url]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout
    return int(next(line for line in out.splitlines() if "requests in" in line).split()[0])


def _wrapper(directory: Path) -> Path:
    """An ``sts-broker`` stand-in that runs bench/broker_variant.py."""
    script = directory / "sts-broker"
    variant = Path(__file__).resolve().parent / "broker_variant.py"
    script.write_text(f'#!/bin/sh\nexec {sys.executable} {variant} "$@"\n')
    script.chmod(0o755)
    return script


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    keys = bench_stack.ApiKeys.generate()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as exits:
        bench_stack.STS_BROKER = _wrapper(Path(tmp))
        stack = bench_stack.Stack(Path(tmp), exits, keys)
        stack.start_sts()
        hello = stack.start_hello(1366, 940)
        targets: list[tuple[str, Child, str]] = [("hello-world", stack.children[-1], hello)]
        for variant in VARIANTS:
            os.environ["VARIANT"] = variant
            broker = stack.start_broker(f"variant-{variant}", event_loop="asyncio")
            targets.append((variant, broker.child, broker.url))
        print("| variant | req/s | CPU µs per request |\n| --- | ---: | ---: |")
        for _ in range(args.rounds):
            for name, child, base in targets:
                hello = name == "hello-world"
                path = "/v1/credentials/x" if hello else "/v1/credentials/service-uploads"
                before = _cpu_seconds(child.pid)
                requests = _wrk(base + path, keys.service, args.seconds)
                spent = _cpu_seconds(child.pid) - before
                print(f"| {name} | {requests / args.seconds:,.0f} | {1e6 * spent / requests:.1f} |")


if __name__ == "__main__":
    main()
