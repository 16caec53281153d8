"""STS calls per scope per token lifetime for a fleet of brokers, with and without Redis.

Starts an STS emulator (in this process, tokens living ``--lifetime`` seconds),
a ``redis-server``, and ``--replicas`` real ``sts-broker serve`` processes;
then, for each backend (``memory``, ``redis``), drives requests for
``--scopes`` scopes round-robin across the replicas for ``--seconds`` and
counts AssumeRole calls at the emulator per scope.  Prints a Markdown table.

    .venv/bin/python bench/fleet.py [--replicas 3] [--scopes 30] [--lifetime 10] [--seconds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from broker.auth import hash_api_key
from broker.dev.emulators.sts import StsEmulator, start_sts_emulator

REPO = Path(__file__).resolve().parent.parent
STS_BROKER = str(Path(sys.executable).parent / "sts-broker")
ACCESS_KEY_ID, ACCESS_KEY_SECRET = "LTAI-bench-fleet", "bench-fleet-secret"
PATH = "/v1/credentials/service-uploads"
MARGIN_SECONDS = 2


@dataclass(frozen=True)
class Options:
    replicas: int
    scopes: int
    lifetime: int
    seconds: float
    rate: float
    append_to: Path | None = None


@dataclass(frozen=True)
class Result:
    backend: str
    requests: int
    errors: int
    calls_per_scope: list[int]
    p50_ms: float
    p99_ms: float


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def redis_server() -> Iterator[str]:
    """A throwaway redis-server on a free port; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed: run `bash tools/install-system-deps.sh`")
    port = _free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        proc.wait(10)


def _config(workdir: Path, port: int, sts_url: str, options: Options, cache: str) -> Path:
    callers = "".join(
        f"    - id: svc-{i}\n      key_sha256: {hash_api_key(f'k-{i}')}\n      groups: [internal]\n"
        for i in range(options.scopes)
    )
    path = workdir / f"broker-{port}.yaml"
    path.write_text(
        f"listen: {{host: 127.0.0.1, port: {port}}}\n"
        f"sts: {{endpoint: '{sts_url}', timeout_seconds: 5}}\n"
        f"policies_dir: {REPO / 'policies'}\n"
        "logging: {format: json, level: warning}\n"
        "quotas: {caller_requests_per_second: 100000, caller_burst: 1000000,"
        " sts_calls_per_second: 100, sts_burst: 100}\n"
        f"cache:\n  refresh_margin_seconds: {MARGIN_SECONDS}\n{cache}"
        f"auth:\n  api_keys:\n{callers}",
        encoding="utf-8",
    )
    return path


def _redis_cache(workdir: Path, redis_url: str) -> str:
    keys = workdir / "cache-keys.json"
    key = base64.b64encode(os.urandom(32)).decode()
    keys.write_text(json.dumps({"active": "k1", "keys": {"k1": key}}))
    return (
        f"  backend: redis\n  redis: {{url: '{redis_url}', key_prefix: 'bench-{time.time_ns()}:',"
        f" encryption_keys_file: {keys}}}\n"
    )


@contextlib.asynccontextmanager
async def brokers(
    workdir: Path, sts_url: str, options: Options, cache: str
) -> AsyncIterator[list[str]]:
    """``options.replicas`` serve processes; yields their credential URLs; always stops them."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("ALIBABA_CLOUD")}
    env.update(
        ALIBABA_CLOUD_ACCESS_KEY_ID=ACCESS_KEY_ID,
        ALIBABA_CLOUD_ACCESS_KEY_SECRET=ACCESS_KEY_SECRET,
        ALIBABA_CLOUD_ECS_METADATA_DISABLED="true",
    )
    procs: list[asyncio.subprocess.Process] = []
    urls: list[str] = []
    try:
        for _ in range(options.replicas):
            port = _free_port()
            config = _config(workdir, port, sts_url, options, cache)
            with (workdir / f"broker-{port}.log").open("wb") as log:
                procs.append(
                    await asyncio.create_subprocess_exec(
                        STS_BROKER, "serve", "--config", str(config), env=env, stderr=log
                    )
                )
            urls.append(f"http://127.0.0.1:{port}")
        await asyncio.gather(*(_ready(url) for url in urls))
        yield [url + PATH for url in urls]
    finally:
        await asyncio.gather(*(_stop(proc) for proc in procs))


async def _ready(base_url: str, seconds: float = 30.0) -> None:
    async with aiohttp.ClientSession() as session, asyncio.timeout(seconds):
        while True:
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(base_url + "/healthz") as reply:
                    if reply.status == 200:
                        return
            await asyncio.sleep(0.1)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(10):
                await proc.wait()
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def drive(urls: list[str], options: Options) -> tuple[int, int, list[float]]:
    """Round-robin requests (scope by scope, each on every replica) at ``options.rate``/s."""
    turns = itertools.count()
    deadline = time.monotonic() + options.seconds
    latencies: list[float] = []
    errors = 0
    workers = 20
    pause = workers / options.rate

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        while time.monotonic() < deadline:
            turn = next(turns)
            scope = (turn // len(urls)) % options.scopes
            headers = {"Authorization": f"Bearer k-{scope}"}
            started = time.perf_counter()
            async with session.get(urls[turn % len(urls)], headers=headers) as reply:
                await reply.read()
                errors += reply.status != 200
            latencies.append(time.perf_counter() - started)
            await asyncio.sleep(max(0.0, pause - (time.perf_counter() - started)))

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        await asyncio.gather(*(worker(session) for _ in range(workers)))
    return len(latencies), errors, latencies


async def run_backend(
    backend: str, workdir: Path, options: Options, redis_url: str | None
) -> Result:
    emulator = StsEmulator(
        access_keys={ACCESS_KEY_ID: ACCESS_KEY_SECRET}, lifetime_seconds=options.lifetime
    )
    runner, sts_url = await start_sts_emulator(emulator)
    try:
        cache = _redis_cache(workdir, redis_url) if redis_url else ""
        async with brokers(workdir, sts_url, options, cache) as urls:
            requests, errors, latencies = await drive(urls, options)
    finally:
        await runner.cleanup()
    per_scope = Counter(
        call.params.get("RoleSessionName", "?")
        for call in emulator.calls
        if call.outcome == "issued"
    )
    cuts = statistics.quantiles(latencies, n=100)
    return Result(
        backend,
        requests,
        errors,
        [per_scope.get(f"svc-{i}", 0) for i in range(options.scopes)],
        cuts[49] * 1000,
        cuts[98] * 1000,
    )


def table(results: list[Result], options: Options) -> str:
    lifetimes = options.seconds / options.lifetime
    lines = [
        f"{options.replicas} replicas, {options.scopes} scopes, tokens living {options.lifetime} s "
        f"(refresh margin {MARGIN_SECONDS} s), {options.seconds:g} s = {lifetimes:g} lifetimes, "
        f"~{options.rate:g} requests/s round-robin",
        "",
        "| backend | requests | errors | AssumeRole | per scope (min-max) "
        "| per scope per lifetime | p50 ms | p99 ms |",
        "|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for result in results:
        calls = result.calls_per_scope
        per_lifetime = sum(calls) / len(calls) / lifetimes
        lines.append(
            f"| {result.backend} | {result.requests} | {result.errors} | {sum(calls)} "
            f"| {min(calls)}-{max(calls)} | {per_lifetime:.2f} "
            f"| {result.p50_ms:.1f} | {result.p99_ms:.1f} |"
        )
    return "\n".join(lines)


async def main(options: Options) -> None:
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-fleet-") as tmp, redis_server() as redis_url:
        for backend in ("memory", "redis"):
            workdir = Path(tmp) / backend
            workdir.mkdir()
            url = redis_url if backend == "redis" else None
            results.append(await run_backend(backend, workdir, options, url))
            print(f"{backend}: done", file=sys.stderr)
    report = table(results, options)
    print(report)
    if options.append_to is not None:
        _append_section(options.append_to, report, options)


_SECTION = "## Fleet: AssumeRole per scope per token lifetime"


def _append_section(path: Path, report: str, options: Options) -> None:
    """Replace (or add) the fleet section of a results file."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    text = text.split(_SECTION)[0].rstrip() + "\n\n"
    command = (
        f"`python bench/fleet.py --replicas {options.replicas} --scopes {options.scopes} "
        f"--lifetime {options.lifetime} --seconds {options.seconds:g} --rate {options.rate:g}` "
        "(part of `make bench`)"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{text}{_SECTION}\n\n{command}\n\n{report}\n", encoding="utf-8")
    if path.resolve() == (REPO / "bench" / "RESULTS.md").resolve():
        print(f"*** fleet section written INTO THE COMMITTED {path} (overwritten) ***")
    else:
        print(f"fleet section written to {path}")


def _options() -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--scopes", type=int, default=30)
    parser.add_argument("--lifetime", type=int, default=10, help="token lifetime, seconds")
    parser.add_argument("--seconds", type=float, default=30.0, help="run time per backend")
    parser.add_argument("--rate", type=float, default=300.0, help="requests a second, in all")
    parser.add_argument("--append", type=Path, default=None, help="add the table to this file")
    args = parser.parse_args()
    return Options(args.replicas, args.scopes, args.lifetime, args.seconds, args.rate, args.append)


if __name__ == "__main__":
    asyncio.run(main(_options()))
