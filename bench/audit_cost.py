"""What an audit record costs: a local loop in-process, then the broker over HTTP with wrk.

Run as ``.venv/bin/python bench/audit_cost.py [--records N] [--wrk-seconds S] [--rounds R]``.

1. In-process: ``Auditor.issued`` for a realistic record, N times, per mode:
   best_effort (handed over, written by the thread once per loop iteration),
   required one request at a time (every record waits for its own write: the
   worst case), required with 50 requests in flight (group commit: one write
   for all the records of a loop iteration), and the same with fsync.  Wall
   time and process CPU time (the writer thread included) per record.
2. Over HTTP: ``sts-broker serve`` answering cached ``GET /v1/credentials``
   under ``wrk -t1 -c50``, one broker per audit configuration, interleaved
   rounds, median requests/s, each as a ratio to best_effort into /dev/null.

Nothing here is a test: figures depend on the machine.  Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import tempfile
import time
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from pathlib import Path

from loadgen import run_wrk
from stack import REPO, SERVICE_ID, ApiKeys, Stack

from broker.audit import Auditor, open_auditor
from broker.config import AuditSettings
from broker.metrics import Metrics
from broker.models import Credentials, Principal
from broker.policies import load_policies

CONFIGS = {
    "best_effort, /dev/null": "audit: {sink: /dev/null}\n",
    "best_effort, file": "audit: {sink: AUDIT_FILE}\n",
    "required, file": "audit: {sink: AUDIT_FILE, mode: required}\n",
    "required, file, fsync": "audit: {sink: AUDIT_FILE, mode: required, fsync: true}\n",
}


def _sample() -> tuple[Principal, object, Credentials]:
    policies = load_policies(REPO / "policies")
    principal = Principal(SERVICE_ID, ("internal",))
    scope = policies.scope("service-uploads", principal)
    token = Credentials(
        access_key_id="STS.NUxb3bench0000000000000",
        access_key_secret="s" * 30,
        security_token="CAIS" + "t" * 1200,
        expiration=datetime.now(UTC) + timedelta(hours=1),
        sts_request_id="6894B13B-6D71-4EF5-88FA-F32781734A7F",
    )
    return principal, scope, token


async def _one(auditor: Auditor, sample: tuple[Principal, object, Credentials]) -> None:
    principal, scope, token = sample
    await auditor.issued(
        "credentials_issued",
        principal,
        scope,  # type: ignore[arg-type]
        token,
        cache="hit",
        expiration=token.expiration_iso(),
        expires_in=3000,
    )


async def _loop(auditor: Auditor | None, records: int, in_flight: int) -> None:
    """``in_flight`` requests, each issuing ``records / in_flight`` in turn, as connections do."""
    sample = _sample()

    async def connection() -> None:
        for _ in range(records // in_flight):
            if auditor is not None:
                await _one(auditor, sample)
            await asyncio.sleep(0)  # a request's other awaits (reading, writing the reply)

    await asyncio.gather(*(connection() for _ in range(in_flight)))


def _micro(records: int, workdir: Path) -> list[tuple[str, float, float]]:
    cases: list[tuple[str, AuditSettings, int]] = [
        ("best_effort, file, 50 in flight", AuditSettings(sink=str(workdir / "a.jsonl")), 50),
        (
            "required, file, 1 in flight",
            AuditSettings(sink=str(workdir / "b.jsonl"), mode="required"),
            1,
        ),
        (
            "required, file, 50 in flight",
            AuditSettings(sink=str(workdir / "c.jsonl"), mode="required"),
            50,
        ),
        (
            "required, file + fsync, 50 in flight",
            AuditSettings(sink=str(workdir / "d.jsonl"), mode="required", fsync=True),
            50,
        ),
    ]
    wall, cpu = _timed(_loop(None, records, 50))
    results = [
        ("the loop alone, 50 in flight (subtract this)", wall / records * 1e6, cpu / records * 1e6)
    ]
    for name, settings, in_flight in cases:
        auditor = open_auditor(settings, Metrics(), time.time)
        count = records if not settings.fsync else max(500, records // 20)
        wall, cpu = _timed(_run(auditor, count, in_flight))
        results.append((name, wall / count * 1e6, cpu / count * 1e6))
    return results


async def _run(auditor: Auditor, records: int, in_flight: int) -> None:
    await _loop(auditor, records, in_flight)
    await auditor.flushed()
    await auditor.close()


def _timed(work: Coroutine[None, None, None]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    asyncio.run(work)
    return time.perf_counter() - wall, time.process_time() - cpu


def _http(workdir: Path, seconds: int, rounds: int) -> dict[str, list[float]]:
    keys = ApiKeys.generate()
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with contextlib.ExitStack() as exits:
        stack = Stack(workdir, exits, keys)
        stack.start_sts()
        brokers = {}
        for index, (name, audit) in enumerate(CONFIGS.items()):
            extra = audit.replace("AUDIT_FILE", str(workdir / f"audit-{index}.jsonl"))
            brokers[name] = stack.start_broker(f"broker-{index}", extra_config=extra)
        headers = [f"Authorization: Bearer {keys.service}"]
        for broker in brokers.values():  # warm: the first request is the miss
            run_wrk(
                f"{broker.url}/v1/credentials/service-uploads", duration_seconds=1, headers=headers
            )
        for _ in range(rounds):
            for name, broker in brokers.items():
                url = f"{broker.url}/v1/credentials/service-uploads"
                result = run_wrk(url, duration_seconds=seconds, headers=headers)
                rates[name].append(result.requests_per_second)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--wrk-seconds", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-http", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        workdir = Path(tmp)
        print(f"in-process, {args.records} records (fsync: {max(500, args.records // 20)}):")
        print("| case | wall µs/record | CPU µs/record |\n| --- | ---: | ---: |")
        for name, wall, cpu in _micro(args.records, workdir):
            print(f"| {name} | {wall:.1f} | {cpu:.1f} |")
        if args.no_http:
            return
        rates = _http(workdir, args.wrk_seconds, args.rounds)
    base = statistics.median(rates["best_effort, /dev/null"])
    print(
        f"\ncached GET /v1/credentials, wrk -t1 -c50, {args.rounds} rounds of {args.wrk_seconds} s:"
    )
    print("| audit | median req/s | ratio | µs/request |\n| --- | ---: | ---: | ---: |")
    for name, values in rates.items():
        median = statistics.median(values)
        print(f"| {name} | {median:,.0f} | {median / base:.2f} | {1e6 / median:.0f} |")


if __name__ == "__main__":
    main()
