"""``make bench``: the broker measured against baselines taken in the same run, as ratios.

Run as ``.venv/bin/python bench/run.py [--quick] [--output FILE]``.  The machine
is shared and noisy, so every HTTP figure is a ratio against a hello-world
baseline (or the 1-process broker) measured in the same run, in interleaved
rounds (A, B, A, B, ...), and the median of the per-round ratios is reported
beside the raw numbers.  Everything runs on 127.0.0.1; every child process
runs in its own process group and is stopped on exit or error.

The full run writes ``bench/RESULTS.md``; ``--quick`` (short wrk runs, one
round) only prints, unless ``--output`` is given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import cold_start
import presign_inprocess
import report
from loadgen import WrkResult, run_wrk, write_post_script, wrk_version
from procs import get_body
from stack import BENCH, SERVICE_ID, ApiKeys, Broker, Stack, caller_rate_limit

__all__ = ["main"]

CREDENTIALS_PATH = "/v1/credentials/service-uploads"
PRESIGN_PATH = "/v1/presign"
PRESIGN_BODY = json.dumps(
    {"policy": "service-uploads", "key": f"services/{SERVICE_ID}/bench.bin", "method": "PUT"},
    separators=(",", ":"),
)
CONNECTIONS = 50
COLD_REQUESTS = 1000
CACHED_SCOPES = 100_000
_EVENT = re.compile(rb'"event": ?"([A-Za-z0-9_]+)"')


@dataclass(frozen=True)
class Plan:
    """How long and how often to measure."""

    wrk_seconds: int
    warmup_seconds: int
    rounds: int
    presign_rounds: int


FULL = Plan(wrk_seconds=10, warmup_seconds=2, rounds=3, presign_rounds=15)
QUICK = Plan(wrk_seconds=2, warmup_seconds=1, rounds=1, presign_rounds=3)


@dataclass(frozen=True)
class Target:
    """One wrk workload: a URL, its headers, and a Lua script for POSTs."""

    key: str
    label: str
    url: str
    headers: tuple[str, ...] = ()
    script: Path | None = None


@dataclass
class Results:
    """Everything one run measured."""

    plan: Plan
    cold: cold_start.ColdResult | None = None
    cold_sts_calls: int = -1
    get_bytes: int = 0
    post_bytes: int = 0
    rounds: dict[str, list[WrkResult]] = field(default_factory=dict)
    warmups: dict[str, WrkResult] = field(default_factory=dict)
    presign: list[presign_inprocess.CaseTiming] = field(default_factory=list)
    memory: dict[str, float] = field(default_factory=dict)
    sts_rate: float = 0.0
    sts_burst: float = 0.0
    workers_warmup_sts_calls: int = 0
    broker_rss_mb: float = 0.0
    log_lines: int = 0
    log_events: dict[str, int] = field(default_factory=dict)
    requests_to_main: int = 0
    warning_log_bytes: int = 0


# --- the run ---


def _measure(stack: Stack, plan: Plan) -> Results:
    results = Results(plan)
    stack.start_sts()
    main_broker = stack.start_broker("broker")
    _cold(stack, main_broker, results)
    results.get_bytes, results.post_bytes = _reply_sizes(main_broker, stack.keys)
    hello_url = stack.start_hello(results.get_bytes, results.post_bytes)
    warning = stack.start_broker("broker-warning", level="warning")
    two = stack.start_broker("broker-2-workers", workers=2)
    results.sts_rate = two.settings.quotas.sts_calls_per_second
    results.sts_burst = two.settings.quotas.sts_burst
    for broker in (main_broker, warning):
        _warm(broker, stack.keys, connections=1)
    before = stack.sts_issued()
    _warm(two, stack.keys, connections=20)  # new connections reach both workers
    results.workers_warmup_sts_calls = stack.sts_issued() - before
    targets = _targets(stack, main_broker, warning, two, hello_url)
    _load_rounds(targets, plan, results)
    results.presign = _presign_inprocess(plan)
    results.memory = _cache_memory()
    results.broker_rss_mb = _rss_mb(main_broker.child.pid)
    _count_logs(results, main_broker, warning)
    return results


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


def _targets(stack: Stack, main: Broker, warning: Broker, two: Broker, hello: str) -> list[Target]:
    auth = f"Authorization: Bearer {stack.keys.service}"
    script = write_post_script(stack.workdir / "presign.lua", PRESIGN_BODY, auth.split(": ", 1)[1])
    return [
        Target("hello_get", "hello-world GET", hello + CREDENTIALS_PATH, (auth,)),
        Target("creds", "broker GET credentials (info log)", main.url + CREDENTIALS_PATH, (auth,)),
        Target("hello_post", "hello-world POST", hello + PRESIGN_PATH, script=script),
        Target("presign", "broker POST presign (info log)", main.url + PRESIGN_PATH, script=script),
        Target(
            "creds_warning",
            "broker GET credentials (warning log)",
            warning.url + CREDENTIALS_PATH,
            (auth,),
        ),
        Target(
            "creds_2w", "broker --workers 2 GET credentials", two.url + CREDENTIALS_PATH, (auth,)
        ),
    ]


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


def _cache_memory() -> dict[str, float]:
    """bench/cache_memory.py in its own process; its JSON line."""
    print(f"\n[memory] CredentialCache with {CACHED_SCOPES:,} scopes (STS bypassed)", flush=True)
    argv = [sys.executable, str(BENCH / "cache_memory.py"), "--scopes", str(CACHED_SCOPES)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=180, check=True)
    memory: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  RSS {memory['rss_before_mb']:.1f} MB -> {memory['rss_after_mb']:.1f} MB", flush=True)
    return memory


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


# --- the figures ---


def _median_ratio(numerators: Sequence[WrkResult], denominators: Sequence[WrkResult]) -> float:
    pairs = zip(numerators, denominators, strict=True)
    return statistics.median(a.requests_per_second / b.requests_per_second for a, b in pairs)


def _median(results: Sequence[WrkResult], attribute: str) -> float:
    return statistics.median(getattr(r, attribute) for r in results)


def _rounds_text(results: Sequence[WrkResult]) -> str:
    return ", ".join(f"{r.requests_per_second:,.0f}" for r in results)


def _clean(*groups: Sequence[WrkResult]) -> bool:
    return all(r.clean for group in groups for r in group)


def _throughput_figure(
    name: str, target: str, minimum: float, ours: list[WrkResult], base: list[WrkResult]
) -> report.Figure:
    ratio = _median_ratio(ours, base)
    raw = (
        f"broker {_median(ours, 'requests_per_second'):,.0f} req/s "
        f"(rounds {_rounds_text(ours)}) vs hello-world {_median(base, 'requests_per_second'):,.0f} "
        f"req/s (rounds {_rounds_text(base)}); broker p50 {_median(ours, 'p50_ms'):.2f} ms, "
        f"p99 {_median(ours, 'p99_ms'):.2f} ms; hello-world p99 {_median(base, 'p99_ms'):.2f} ms"
    )
    if not _clean(ours, base):
        raw += "; NON-2xx OR SOCKET ERRORS SEEN"
    return report.Figure(name, target, f"{ratio:.2f}", raw, ratio >= minimum and _clean(ours, base))


def _http_figures(r: Results) -> list[report.Figure]:
    creds, hello_get = r.rounds["creds"], r.rounds["hello_get"]
    p99 = _median(creds, "p99_ms")
    per_round = ", ".join(f"{x.p99_ms:.2f}" for x in creds)
    return [
        _throughput_figure(
            "Cached `GET /v1/credentials/service-uploads` throughput / hello-world",
            "≥ 0.75",
            0.75,
            creds,
            hello_get,
        ),
        _throughput_figure(
            "`POST /v1/presign` throughput / hello-world POST",
            "≥ 0.6",
            0.6,
            r.rounds["presign"],
            r.rounds["hello_post"],
        ),
        report.Figure(
            f"p99 latency, cached credentials, {CONNECTIONS} connections",
            "≤ 10 ms",
            f"{p99:.2f} ms",
            f"median of rounds; per round {per_round} ms; p50 {_median(creds, 'p50_ms'):.2f} ms",
            p99 <= 10.0,
        ),
    ]


def _presign_figure(r: Results) -> report.Figure:
    slowest = min(r.presign, key=lambda t: t.speedup)
    identical = all(t.identical for t in r.presign)
    raw = "; ".join(
        f"{t.name}: ours {t.ours_us:.2f} µs vs SDK {t.sdk_us:.1f} µs = {t.speedup:.1f}x"
        for t in r.presign
    )
    value = f"{slowest.speedup:.1f}x (slowest case), byte-identical: {'yes' if identical else 'NO'}"
    met = slowest.speedup >= 10.0 and identical
    return report.Figure(
        "In-process presign vs `alibabacloud-oss-v2` `presign()`",
        "≥ 10x and byte-identical",
        value,
        raw,
        met,
    )


def _cold_figure(r: Results) -> report.Figure:
    cold = r.cold
    assert cold is not None
    raw = (
        f"statuses {dict(cold.statuses)}; all {COLD_REQUESTS} served in {cold.seconds:.2f} s "
        f"(per request p50 {cold.p50_ms:.0f} ms, max {cold.max_ms:.0f} ms); "
        "counted at the emulator (GET /__emulator__/calls)"
    )
    return report.Figure(
        f"STS calls for {COLD_REQUESTS:,} concurrent cold requests, one scope",
        "= 1",
        f"{r.cold_sts_calls}",
        raw,
        r.cold_sts_calls == 1 and cold.all_ok,
    )


def _memory_figure(r: Results) -> report.Figure:
    m = r.memory
    minutes = CACHED_SCOPES / r.sts_rate / 60
    raw = (
        f"before {m['rss_before_mb']:.1f} MB, after {m['rss_after_mb']:.1f} MB, "
        f"delta {m['delta_mb']:.1f} MB for {int(m['entries']):,} entries "
        f"(mean policy {m['mean_policy_chars']:.0f} chars). STS BYPASSED: an in-memory fetch "
        f"returns STS-sized credentials, because {CACHED_SCOPES:,} real AssumeRole calls would "
        f"take {minutes:.0f} min at the configured {r.sts_rate:g}/s budget"
    )
    after = m["rss_after_mb"]
    return report.Figure(
        f"RSS with {CACHED_SCOPES:,} cached scopes",
        "≤ 250 MB",
        f"{after:.0f} MB",
        raw,
        after <= 250,
    )


def _workers_figure(r: Results) -> report.Figure:
    two, one = r.rounds["creds_2w"], r.rounds["creds"]
    ratio = _median_ratio(two, one)
    raw = (
        f"2 workers {_median(two, 'requests_per_second'):,.0f} req/s (rounds {_rounds_text(two)}) "
        f"vs 1 process {_median(one, 'requests_per_second'):,.0f} req/s; wrk -t1 competes for "
        "the same 2 cores; 2-worker p99 "
        f"{_median(two, 'p99_ms'):.2f} ms"
    )
    met = ratio >= 1.7 and _clean(two, one)
    return report.Figure(
        "`--workers 2` vs 1 process, cached credentials, 2 cores",
        "≥ 1.7x",
        f"{ratio:.2f}x",
        raw,
        met,
    )


def _secondary(r: Results) -> list[report.Secondary]:
    warn, info, hello = r.rounds["creds_warning"], r.rounds["creds"], r.rounds["hello_get"]
    per_worker = r.sts_rate / 2
    return [
        report.Secondary(
            "Cached credentials / hello-world, `logging.level: warning`",
            f"{_median_ratio(warn, hello):.2f}",
            f"{_median(warn, 'requests_per_second'):,.0f} req/s (rounds {_rounds_text(warn)}), "
            f"p99 {_median(warn, 'p99_ms'):.2f} ms; log written: {r.warning_log_bytes} bytes",
        ),
        report.Secondary(
            "Cost of info logging: cached credentials at info / at warning",
            f"{_median_ratio(info, warn):.2f}",
            f"{r.log_lines:,} log lines from the info broker for ~{r.requests_to_main:,} "
            f"requests ({r.log_lines / max(1, r.requests_to_main):.1f} per request); by event: "
            + ", ".join(f"{event} {count:,}" for event, count in r.log_events.items()),
        ),
        report.Secondary(
            "STS budget with `--workers 2`",
            f"{per_worker:g}/s per worker",
            f"quotas.sts_calls_per_second {r.sts_rate:g} in the config / 2 workers "
            f"(sts_burst {r.sts_burst:g} -> {max(1.0, r.sts_burst / 2):g} each); each worker has "
            f"its own cache: warming 2 scopes on 2 workers took {r.workers_warmup_sts_calls} "
            "AssumeRole calls",
        ),
        report.Secondary(
            "Broker RSS after the run (1 process, 2 scopes cached)",
            f"{r.broker_rss_mb:.0f} MB",
            "VmRSS of the info-level broker at the end",
        ),
    ]


def _notes(r: Results) -> list[str]:
    p = r.plan
    return [
        f"Each HTTP figure: {p.rounds} interleaved round(s) over 6 workloads (hello GET, broker "
        f"GET, hello POST, broker POST, broker GET at warning level, 2-worker broker GET), each "
        f"`wrk -t1 -c{CONNECTIONS} -d{p.wrk_seconds}s --latency` after a {p.warmup_seconds} s "
        "warm-up; a ratio is the median of the per-round ratios, raw numbers are medians.",
        f"hello-world (bench/hello.py, aiohttp, no access log) replies with JSON bodies of the "
        f"broker's sizes: {r.get_bytes} B for credentials, {r.post_bytes} B for presign.",
        "Brokers run `sts-broker serve --config <temp>` with `logging: {format: json, level: "
        "info}` and stderr to a file (production logging on); a second broker at `level: "
        "warning` gives the secondary figure.",
        f"`quotas.caller_requests_per_second` is {caller_rate_limit():g}: 1e6 was asked for, "
        "the config accepts at most that; `caller_burst` 1e6. No request was throttled unless "
        "a row says NON-2xx.",
        "STS is the emulator (bench/sts_server.py) in its own process on 127.0.0.1; the broker "
        "signs its calls with the emulator's key from ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET.",
        f"The cold burst is the first traffic a freshly started broker sees: {COLD_REQUESTS} "
        "aiohttp requests at once (connector limit 1,000), before any warm-up.",
        "The 2-core machine is shared: wrk, the broker(s) and the baseline run on the same "
        "cores, so 2 workers cannot get 2 cores to themselves.",
    ]


def _render(r: Results, command: str, load_before: str, seconds: float) -> str:
    figures = [
        *_http_figures(r),
        _presign_figure(r),
        _cold_figure(r),
        _memory_figure(r),
        _workers_figure(r),
    ]
    facts = report.machine_facts(BENCH.parent, wrk_version(), load_before)
    facts.append(("run time", f"{seconds:.0f} s"))
    return report.render(command, facts, figures, _secondary(r), _notes(r))


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
    parser.add_argument("--quick", action="store_true", help="short wrk runs, one round")
    parser.add_argument("--output", type=Path, help="where to write the Markdown report")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Run every measurement, print the report, write it (full runs: bench/RESULTS.md)."""
    args = _parse(argv)
    plan = QUICK if args.quick else FULL
    output = args.output or (None if args.quick else BENCH / "RESULTS.md")
    _raise_open_files_limit()
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    load_before = report.load_average()
    started = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="sts-broker-bench-") as workdir,
        contextlib.ExitStack() as exits,
    ):
        results = _measure(Stack(Path(workdir), exits, ApiKeys.generate()), plan)
    command = "make bench" if not args.quick else ".venv/bin/python bench/run.py --quick"
    text = _render(results, command, load_before, time.monotonic() - started)
    print("\n" + text)
    if output is not None:
        output.write_text(text, encoding="utf-8")
        print(f"written to {output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
