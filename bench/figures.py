"""What one ``make bench`` run measured, and the figures it makes of it against issue 14's targets.

Every HTTP figure is the median of per-round ratios (interleaved rounds, so a
busy moment of the shared machine hits both sides of a ratio alike); the raw
numbers beside it are medians over the rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import cold_start
import key_count
import presign_inprocess
import report
from loadgen import WrkResult

__all__ = ["CACHED_SCOPES", "COLD_REQUESTS", "CONNECTIONS", "JWT_SUBJECTS", "Plan", "Results"]
__all__ += ["figures", "notes", "secondary"]

CONNECTIONS = 50
COLD_REQUESTS = 1000
CACHED_SCOPES = 100_000
JWT_SUBJECTS = 10_000
MANY_KEYS = 1000


@dataclass(frozen=True)
class Plan:
    """How long and how often to measure."""

    wrk_seconds: int
    warmup_seconds: int
    rounds: int
    presign_rounds: int


@dataclass
class Results:
    """Everything one run measured."""

    plan: Plan
    main_loop: str = "?"
    other_loop: str | None = None
    """The loop the second broker runs on (None: uvloop is not installed, one way only)."""
    cold: cold_start.ColdResult | None = None
    cold_sts_calls: int = -1
    get_bytes: int = 0
    post_bytes: int = 0
    rounds: dict[str, list[WrkResult]] = field(default_factory=dict)
    warmups: dict[str, WrkResult] = field(default_factory=dict)
    presign: list[presign_inprocess.CaseTiming] = field(default_factory=list)
    key_check: key_count.KeyCountTiming | None = None
    memory: dict[str, float] = field(default_factory=dict)
    jwt: dict[str, Any] = field(default_factory=dict)
    sts_rate: float = 0.0
    sts_burst: float = 0.0
    workers_warmup_sts_calls: int = 0
    broker_rss_mb: float = 0.0
    log_lines: int = 0
    log_events: dict[str, int] = field(default_factory=dict)
    requests_to_main: int = 0
    warning_log_bytes: int = 0


def _ratios(ours: Sequence[WrkResult], base: Sequence[WrkResult], attribute: str) -> list[float]:
    pairs = zip(ours, base, strict=True)
    return [getattr(a, attribute) / getattr(b, attribute) for a, b in pairs]


def _median_ratio(
    ours: Sequence[WrkResult], base: Sequence[WrkResult], attribute: str = "requests_per_second"
) -> float:
    return statistics.median(_ratios(ours, base, attribute))


def _median(results: Sequence[WrkResult], attribute: str) -> float:
    return statistics.median(float(getattr(r, attribute)) for r in results)


def _rounds_text(results: Sequence[WrkResult], attribute: str = "requests_per_second") -> str:
    return ", ".join(f"{getattr(r, attribute):,.{2 if 'ms' in attribute else 0}f}" for r in results)


def _clean(*groups: Sequence[WrkResult]) -> bool:
    return all(r.clean for group in groups for r in group)


def _rps(results: Sequence[WrkResult]) -> str:
    return f"{_median(results, 'requests_per_second'):,.0f} req/s (rounds {_rounds_text(results)})"


def _throughput(
    name: str, minimum: float, ours: Sequence[WrkResult], base: Sequence[WrkResult], base_name: str
) -> report.Figure:
    ratio = _median_ratio(ours, base)
    raw = (
        f"broker {_rps(ours)} vs {base_name} {_rps(base)}; per-round ratios "
        + ", ".join(f"{x:.2f}" for x in _ratios(ours, base, "requests_per_second"))
        + f"; broker p50 {_median(ours, 'p50_ms'):.2f} ms, p99 {_median(ours, 'p99_ms'):.2f} ms"
    )
    if not _clean(ours, base):
        raw += "; NON-2xx OR SOCKET ERRORS SEEN"
    met = ratio >= minimum and _clean(ours, base)
    return report.Figure(name, f"≥ {minimum:.2f}", f"{ratio:.2f}", raw, met)


def _p99_figure(r: Results) -> report.Figure:
    creds, hello = r.rounds["creds"], r.rounds["hello_get"]
    ratio = _median_ratio(creds, hello, "p99_ms")
    raw = (
        f"broker p99 per round {_rounds_text(creds, 'p99_ms')} ms, hello-world p99 per round "
        f"{_rounds_text(hello, 'p99_ms')} ms; per-round ratios "
        + ", ".join(f"{x:.2f}" for x in _ratios(creds, hello, "p99_ms"))
        + f"; broker p50 {_median(creds, 'p50_ms'):.2f} ms"
    )
    return report.Figure(
        f"p99 latency at {CONNECTIONS} connections, cached credentials / hello-world p99",
        "≤ 2.5",
        f"{ratio:.2f} ({_median(creds, 'p99_ms'):.2f} ms vs {_median(hello, 'p99_ms'):.2f} ms)",
        raw,
        ratio <= 2.5 and _clean(creds, hello),
    )


def _http_figures(r: Results) -> list[report.Figure]:
    loop = f" ({r.main_loop})"
    return [
        _throughput(
            "Cached `GET /v1/credentials/service-uploads` / hello-world" + loop,
            0.50,
            r.rounds["creds"],
            r.rounds["hello_get"],
            "hello-world",
        ),
        _throughput(
            "`POST /v1/presign` / hello-world POST" + loop,
            0.35,
            r.rounds["presign"],
            r.rounds["hello_post"],
            "hello-world",
        ),
        _p99_figure(r),
        _throughput(
            f"Cached credentials with {MANY_KEYS:,} API keys configured / with 2 keys",
            0.95,
            r.rounds["creds_1000_keys"],
            r.rounds["creds"],
            "2-key broker",
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
    name = "In-process presign vs `alibabacloud-oss-v2` `presign()`"
    return report.Figure(name, "≥ 10x and byte-identical", value, raw, met)


def _cold_figure(r: Results) -> report.Figure:
    cold = r.cold
    assert cold is not None
    raw = (
        f"statuses {dict(cold.statuses)}; all {COLD_REQUESTS} served in {cold.seconds:.2f} s "
        f"(per request p50 {cold.p50_ms:.0f} ms, max {cold.max_ms:.0f} ms); "
        "counted at the emulator (GET /__emulator__/calls)"
    )
    met = r.cold_sts_calls == 1 and cold.all_ok
    name = f"STS calls for {COLD_REQUESTS:,} concurrent cold requests, one scope"
    return report.Figure(name, "= 1", f"{r.cold_sts_calls}", raw, met)


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
    name = f"RSS with {CACHED_SCOPES:,} cached scopes"
    return report.Figure(name, "≤ 250 MB", f"{after:.0f} MB", raw, after <= 250)


def _jwt_figure(r: Results) -> report.Figure:
    j = r.jwt
    grown: dict[str, dict[str, Any]] = j["memos_grown"]
    memos = "; ".join(
        f"`{path}`: {m['before']:,} -> {m['entries']:,} entries, bound {m['bound']}"
        for path, m in grown.items()
    )
    bounded = all(m["bound"] != "unbounded" for m in grown.values())
    raw = (
        f"{j['subjects']:,} distinct `sub` claims, ES256 tokens verified against a JWKS served "
        f"on 127.0.0.1 ({j['verify_us']:.0f} µs per token incl. the request quota); RSS "
        f"{j['rss_before_mb']:.1f} -> {j['rss_after_mb']:.1f} MB (delta {j['delta_mb']:.1f} MB); "
        f"{j['containers_watched']} dicts/caches/lru_caches watched; grown by >= 100: "
        + (memos or "none (no per-subject memo)")
    )
    value = f"{len(grown)} grew, all bounded" if bounded else "UNBOUNDED memo"
    name = (
        f"Per-subject memory after {JWT_SUBJECTS:,} distinct JWT subjects (bench/jwt_subjects.py)"
    )
    return report.Figure(name, "every memo that grows is bounded", value, raw, bounded)


def _workers_figure(r: Results) -> report.Figure:
    two, one = r.rounds["creds_2w"], r.rounds["creds"]
    ratio = _median_ratio(two, one)
    raw = (
        f"2 workers {_rps(two)} vs 1 process {_median(one, 'requests_per_second'):,.0f} req/s; "
        f"wrk -t1 competes for the same 2 cores; 2-worker p99 {_median(two, 'p99_ms'):.2f} ms"
    )
    met = ratio >= 1.7 and _clean(two, one)
    name = "`--workers 2` / 1 process, cached credentials, 2 cores"
    return report.Figure(name, "≥ 1.7", f"{ratio:.2f}", raw, met)


def figures(r: Results) -> list[report.Figure]:
    """Every figure with a target, in the order of the issue's table (then the older ones)."""
    return [
        *_http_figures(r),
        _memory_figure(r),
        _workers_figure(r),
        _jwt_figure(r),
        _presign_figure(r),
        _cold_figure(r),
    ]


def _loop_rows(r: Results) -> list[report.Secondary]:
    """The main broker on its loop and a second one on the other loop, same rounds."""
    if r.other_loop is None:
        raw = "uvloop is not installed (pip install 'oss-sts-broker[fast]'): measured one way only"
        return [report.Secondary("uvloop vs asyncio", "not measured", raw)]
    loops = {r.main_loop: ("creds", "presign"), r.other_loop: ("creds_other", "presign_other")}
    hello_get, hello_post = r.rounds["hello_get"], r.rounds["hello_post"]
    rows = []
    for loop, (creds, presign) in loops.items():
        got, posted = r.rounds[creds], r.rounds[presign]
        value = f"{_median_ratio(got, hello_get):.2f} / {_median_ratio(posted, hello_post):.2f}"
        raw = f"cached credentials {_rps(got)}; presign {_rps(posted)}"
        name = f"On {loop}: cached credentials / hello-world, presign / hello-world POST"
        rows.append(report.Secondary(name, value, raw))
    uv, aio = loops["uvloop"], loops["asyncio"]
    ratios = [_median_ratio(r.rounds[u], r.rounds[a]) for u, a in zip(uv, aio, strict=True)]
    value = f"{ratios[0]:.2f} / {ratios[1]:.2f}"
    raw = "median of per-round ratios, cached credentials / presign; same rounds as above"
    rows.append(report.Secondary("uvloop / asyncio throughput (cached / presign)", value, raw))
    return rows


def _key_check_row(r: Results) -> report.Secondary:
    k = r.key_check
    assert k is not None
    return report.Secondary(
        f"API-key check in-process, {k.many:,} keys / {k.few} keys (bench/key_count.py)",
        f"{k.many_us:.1f} µs / {k.few_us:.1f} µs",
        f"`ApiKeyAuthenticator.authenticate` of the last key, no HTTP; {k.many_us - k.few_us:.1f}"
        " µs more per request with the larger list (median of interleaved rounds' best)",
    )


def secondary(r: Results) -> list[report.Secondary]:
    """Figures reported for context, without a target."""
    warn, info, hello = r.rounds["creds_warning"], r.rounds["creds"], r.rounds["hello_get"]
    per_worker = r.sts_rate / 2
    return [
        *_loop_rows(r),
        _key_check_row(r),
        report.Secondary(
            "Cached credentials / hello-world, `logging.level: warning`",
            f"{_median_ratio(warn, hello):.2f}",
            f"{_rps(warn)}, p99 {_median(warn, 'p99_ms'):.2f} ms; log written: "
            f"{r.warning_log_bytes} bytes",
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


def notes(r: Results, workloads: Sequence[str]) -> list[str]:
    """How the figures were measured, for the report's last section."""
    p = r.plan
    return [
        f"Each HTTP figure: {p.rounds} interleaved round(s) over {len(workloads)} workloads "
        f"({', '.join(workloads)}), each `wrk -t1 -c{CONNECTIONS} -d{p.wrk_seconds}s --latency` "
        f"after a {p.warmup_seconds} s warm-up; a ratio is the median of the per-round ratios, "
        "raw numbers are medians.",
        f"hello-world (bench/hello.py, aiohttp, no access log) replies with JSON bodies of the "
        f"broker's sizes: {r.get_bytes} B for credentials, {r.post_bytes} B for presign.",
        "Brokers run `sts-broker serve --config <temp>` with `logging: {format: json, level: "
        "info}` and stderr to a file (production logging on); a second broker at `level: "
        "warning` gives the secondary figure.",
        f"Event loop: the headline brokers use the default the product ships, `listen.event_loop:"
        f" auto`, which ran **{r.main_loop}** (their `broker_started` line); "
        + (
            f"a second broker with `event_loop: {r.other_loop}` runs in the same rounds."
            if r.other_loop
            else "uvloop is not installed, so the other way was not measured."
        ),
        f"The {MANY_KEYS:,}-key broker has {MANY_KEYS - 2:,} generated keys, then the browser "
        f"caller's, then the service caller's: the key wrk sends is the {MANY_KEYS:,}th (LAST) "
        "of the list. The 2-key broker lists the same two callers in the same order.",
        "`quotas.caller_requests_per_second` is at its maximum and `caller_burst` 1e6: no "
        "request was throttled unless a row says NON-2xx.",
        "STS is the emulator (bench/sts_server.py) in its own process on 127.0.0.1; the broker "
        "signs its calls with the emulator's key from ALIBABA_CLOUD_ACCESS_KEY_ID/SECRET.",
        f"The cold burst is the first traffic a freshly started broker sees: {COLD_REQUESTS} "
        "aiohttp requests at once (connector limit 1,000), before any warm-up.",
        f"JWT subjects: bench/jwt_subjects.py, in its own process, authenticates {JWT_SUBJECTS:,}"
        " tokens with distinct subjects through `build_services` (real config, JWKS over HTTP "
        "on 127.0.0.1) and reports every dict, cache and lru_cache reachable from the services "
        "(or in a broker module) that grew, with its bound.",
        "The 2-core machine is shared: wrk, the broker(s) and the baseline run on the same "
        "cores, so 2 workers cannot get 2 cores to themselves.",
    ]
