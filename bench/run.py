"""``make bench``: the broker measured against baselines taken in the same run, as ratios.

Run as ``.venv/bin/python bench/run.py [--quick] [--output FILE | --write-results]``.
The machine is shared and noisy, so every HTTP figure is a ratio against a
baseline measured in the same run (hello-world, the 2-key broker, the
1-process broker), in interleaved rounds (A, B, C, ..., A, B, C, ...), and the
median of the per-round ratios is reported beside the raw numbers.  Everything
runs on 127.0.0.1; every child process runs in its own process group and is
stopped on exit or error.  The figures and the report are in bench/figures.py.

The report goes to the untracked ``bench/results/latest.md`` unless
``--output`` names another file; ``--write-results`` overwrites the committed
``bench/RESULTS.md`` and says so.  ``--quick`` (one round of 3 s) is for
development.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import re
import resource
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any

import cold_start
import key_count
import presign_inprocess
import report
from figures import (
    CACHED_SCOPES,
    COLD_REQUESTS,
    CONNECTIONS,
    JWT_SUBJECTS,
    MANY_KEYS,
    Plan,
    Results,
    figures,
    notes,
    secondary,
)
from loadgen import WrkResult, run_wrk, write_post_script, wrk_version
from procs import get_body
from stack import BENCH, SERVICE_ID, ApiKeys, Broker, Stack

__all__ = ["main"]

CREDENTIALS_PATH = "/v1/credentials/service-uploads"
PRESIGN_PATH = "/v1/presign"
PRESIGN_BODY = json.dumps(
    {
        "policy": "service-uploads",
        "key": f"services/{SERVICE_ID}/bench.bin",
        "method": "PUT",
        "content_length": 1024,  # required: the policy sets max_object_bytes
    },
    separators=(",", ":"),
)
COMMITTED_RESULTS = BENCH / "RESULTS.md"
DEFAULT_RESULTS = BENCH / "results" / "latest.md"
_EVENT = re.compile(rb'"event": ?"([A-Za-z0-9_]+)"')

FULL = Plan(wrk_seconds=10, warmup_seconds=2, rounds=3, presign_rounds=15)
QUICK = Plan(wrk_seconds=3, warmup_seconds=1, rounds=1, presign_rounds=3)


@dataclass(frozen=True)
class Target:
    """One wrk workload: a URL, its headers, and a Lua script for POSTs."""

    key: str
    label: str
    url: str
    headers: tuple[str, ...] = ()
    script: Path | None = None


@dataclass(frozen=True)
class Brokers:
    """The brokers under test (``other``: on the other event loop, if uvloop is installed)."""

    main: Broker
    many_keys: Broker
    warning: Broker
    two: Broker
    other: Broker | None


# --- the run ---


def _measure(stack: Stack, plan: Plan) -> tuple[Results, list[Target]]:
    results = Results(plan)
    stack.start_sts()
    main_broker = stack.start_broker("broker")  # listen.event_loop: the default (auto)
    _cold(stack, main_broker, results)
    results.get_bytes, results.post_bytes = _reply_sizes(main_broker, stack.keys)
    hello_url = stack.start_hello(results.get_bytes, results.post_bytes)
    brokers = _start_brokers(stack, main_broker, results)
    for broker in (main_broker, brokers.many_keys, brokers.warning, brokers.other):
        if broker is not None:
            _warm(broker, stack.keys, connections=1)
    before = stack.sts_issued()
    _warm(brokers.two, stack.keys, connections=20)  # new connections reach both workers
    results.workers_warmup_sts_calls = stack.sts_issued() - before
    targets = _targets(stack, brokers, hello_url)
    _load_rounds(targets, plan, results)
    results.presign = _presign_inprocess(plan)
    results.key_check = key_count.measure(plan.presign_rounds, many=MANY_KEYS)
    results.memory = _in_own_process("cache_memory.py", "--scopes", CACHED_SCOPES)
    results.jwt = _in_own_process("jwt_subjects.py", "--subjects", JWT_SUBJECTS)
    results.broker_rss_mb = _rss_mb(main_broker.child.pid)
    _count_logs(results, main_broker, brokers.warning)
    return results, targets


def _other_loop(main_loop: str) -> str | None:
    """The loop the main broker does not run on, if it can run here (uvloop installed)."""
    if main_loop == "uvloop":
        return "asyncio"
    return "uvloop" if importlib.util.find_spec("uvloop") is not None else None


def _start_brokers(stack: Stack, main: Broker, results: Results) -> Brokers:
    results.main_loop = main.event_loop
    results.other_loop = _other_loop(main.event_loop)
    other = None
    if results.other_loop is not None:
        other = stack.start_broker(f"broker-{results.other_loop}", event_loop=results.other_loop)
    print(f"[loops] main broker: {main.event_loop}; other: {results.other_loop}", flush=True)
    two = stack.start_broker("broker-2-workers", workers=2)
    results.sts_rate = two.settings.quotas.sts_calls_per_second
    results.sts_burst = two.settings.quotas.sts_burst
    return Brokers(
        main=main,
        many_keys=stack.start_broker(f"broker-{MANY_KEYS}-keys", api_keys=MANY_KEYS),
        warning=stack.start_broker("broker-warning", level="warning"),
        two=two,
        other=other,
    )


def _cold(stack: Stack, broker: Broker, results: Results) -> None:
    """1,000 concurrent requests for one scope before anything else touched the broker."""
    print(f"\n[cold] {COLD_REQUESTS} concurrent requests for one scope, fresh broker", flush=True)
    before = stack.sts_issued()
    url = broker.url + CREDENTIALS_PATH
    results.cold = cold_start.fire(url, stack.keys.service, count=COLD_REQUESTS)
    results.cold_sts_calls = stack.sts_issued() - before
    cold = results.cold
    print(
        f"  statuses {dict(cold.statuses)}, all served in {cold.seconds:.2f} s, "
        f"STS AssumeRole calls: {results.cold_sts_calls}",
        flush=True,
    )


def _reply_sizes(broker: Broker, keys: ApiKeys) -> tuple[int, int]:
    """Body sizes of the broker's credentials and presign replies (the baseline copies them)."""
    auth = {"Authorization": f"Bearer {keys.service}"}
    credentials = get_body(broker.url + CREDENTIALS_PATH, auth)
    post_headers = {**auth, "Content-Type": "application/json"}
    presigned = get_body(broker.url + PRESIGN_PATH, post_headers, PRESIGN_BODY.encode())
    print(f"[sizes] credentials reply {len(credentials)} B, presign reply {len(presigned)} B")
    return len(credentials), len(presigned)


def _warm(broker: Broker, keys: ApiKeys, connections: int) -> None:
    """Fill the cache: each request on a new connection (so every worker sees some)."""
    service = {"Authorization": f"Bearer {keys.service}"}
    browser = {"Authorization": f"Bearer {keys.browser}"}
    post = {**service, "Content-Type": "application/json"}
    for _ in range(connections):
        get_body(broker.url + CREDENTIALS_PATH, service)
        get_body(broker.url + "/v1/credentials/avatar-upload", browser)
        get_body(broker.url + PRESIGN_PATH, post, PRESIGN_BODY.encode())


def _targets(stack: Stack, b: Brokers, hello: str) -> list[Target]:
    """Every workload of a round, in the order they run."""
    auth = f"Authorization: Bearer {stack.keys.service}"
    script = write_post_script(stack.workdir / "presign.lua", PRESIGN_BODY, auth.split(": ", 1)[1])

    def get(key: str, label: str, base: str) -> Target:
        return Target(key, label, base + CREDENTIALS_PATH, (auth,))

    def post(key: str, label: str, base: str) -> Target:
        return Target(key, label, base + PRESIGN_PATH, script=script)

    targets = [
        get("hello_get", "hello-world GET", hello),
        get("creds", f"broker GET credentials ({b.main.event_loop})", b.main.url),
        post("hello_post", "hello-world POST", hello),
        post("presign", f"broker POST presign ({b.main.event_loop})", b.main.url),
        get("creds_1000_keys", f"broker GET credentials, {MANY_KEYS} keys", b.many_keys.url),
    ]
    if b.other is not None:
        loop, url = b.other.event_loop, b.other.url
        targets.append(get("creds_other", f"broker GET credentials ({loop})", url))
        targets.append(post("presign_other", f"broker POST presign ({loop})", url))
    targets.append(get("creds_warning", "broker GET credentials (warning log)", b.warning.url))
    targets.append(get("creds_2w", "broker --workers 2 GET credentials", b.two.url))
    return targets


def _load_rounds(targets: Sequence[Target], plan: Plan, results: Results) -> None:
    """A short warm-up per target, then ``plan.rounds`` interleaved rounds over all targets."""
    print(f"\n[wrk] warm-up {plan.warmup_seconds} s per target", flush=True)
    results.warmups = {target.key: _wrk(target, plan.warmup_seconds) for target in targets}
    results.rounds = {target.key: [] for target in targets}
    seconds = plan.wrk_seconds
    print(f"[wrk] {plan.rounds} round(s) of -t1 -c{CONNECTIONS} -d{seconds}s", flush=True)
    for index in range(plan.rounds):
        for target in targets:
            result = _wrk(target, seconds)
            results.rounds[target.key].append(result)
            print(f"  round {index + 1} {target.label:<38} {result.summary()}", flush=True)


def _wrk(target: Target, seconds: int) -> WrkResult:
    return run_wrk(
        target.url,
        duration_seconds=seconds,
        connections=CONNECTIONS,
        headers=target.headers,
        script=target.script,
    )


def _presign_inprocess(plan: Plan) -> list[presign_inprocess.CaseTiming]:
    print(f"\n[presign] in-process, {plan.presign_rounds} interleaved rounds", flush=True)
    timings = presign_inprocess.measure(plan.presign_rounds)
    for t in timings:
        print(f"  {t.name}: ours {t.ours_us:.2f} µs, SDK {t.sdk_us:.1f} µs, {t.speedup:.1f}x")
    return timings


def _in_own_process(script: str, flag: str, count: int) -> dict[str, Any]:
    """bench/<script> <flag> <count> in its own process (a clean RSS); its last JSON line."""
    print(f"\n[memory] bench/{script} {flag} {count:,}", flush=True)
    argv = [sys.executable, str(BENCH / script), flag, str(count)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench/{script} exited with {done.returncode}:\n{done.stderr[-2000:]}")
    found: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  RSS {found['rss_before_mb']:.1f} MB -> {found['rss_after_mb']:.1f} MB", flush=True)
    return found


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _count_logs(results: Results, main: Broker, warning: Broker) -> None:
    """Proof that production logging was on: lines written by the info-level broker, by event."""
    events: Counter[str] = Counter()
    with main.log_path.open("rb") as log:
        for line in log:
            found = _EVENT.search(line)
            events[found[1].decode() if found else "?"] += 1
    results.log_lines = sum(events.values())
    results.log_events = dict(events.most_common(5))
    keys = ("creds", "presign")
    measured = sum(r.requests for key in keys for r in results.rounds[key])
    warmed = sum(results.warmups[key].requests for key in keys)
    results.requests_to_main = measured + warmed + COLD_REQUESTS
    results.warning_log_bytes = warning.log_path.stat().st_size


# --- entry point ---


def _raise_open_files_limit() -> None:
    """1,000 concurrent connections need more than the usual 1,024 descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 8192 if hard == resource.RLIM_INFINITY else min(hard, 8192)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _exit_on_sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(143)  # unwinds through the ExitStack: every child is stopped


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round of 3 s (development)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help=f"interleaved wrk rounds (default {FULL.rounds}; steadier medians when noisy)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--output",
        type=Path,
        default=DEFAULT_RESULTS,
        help="where to write the Markdown report (default: %(default)s, not tracked by git)",
    )
    where.add_argument(
        "--write-results",
        action="store_const",
        const=COMMITTED_RESULTS,
        dest="output",
        help=f"overwrite the committed {COMMITTED_RESULTS.relative_to(BENCH.parent)}",
    )
    return parser.parse_args(argv)


def _render(r: Results, targets: Sequence[Target], command: str, load: str, seconds: float) -> str:
    facts = report.machine_facts(BENCH.parent, wrk_version(), load)
    facts.append(("run time", f"{seconds:.0f} s"))
    workloads = [target.label for target in targets]
    return report.render(command, facts, figures(r), secondary(r), notes(r, workloads))


def _write(output: Path, text: str) -> None:
    """Write the report; say loudly when that overwrote the committed bench/RESULTS.md."""
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text, encoding="utf-8")
    if output.resolve() == COMMITTED_RESULTS.resolve():
        print(f"*** OVERWROTE THE COMMITTED {output}: review it before committing ***")
    else:
        print(f"written to {output} (bench/RESULTS.md, the committed copy, was not touched)")


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement, print the report and write it (``--output``)."""
    args = _parse(argv)
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = dataclasses.replace(plan, rounds=max(1, args.rounds))
    _raise_open_files_limit()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    load_before = report.load_average()
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="sts-broker-bench-") as workdir,
        contextlib.ExitStack() as exits,
    ):
        results, targets = _measure(Stack(Path(workdir), exits, ApiKeys.generate()), plan)
    command = shlex.join(["bench/run.py", *(sys.argv[1:] if argv is None else argv)])
    text = _render(results, targets, command, load_before, time.monotonic() - started)
    print("\n" + text)
    _write(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
