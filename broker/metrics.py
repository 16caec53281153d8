"""Prometheus metrics: requests, connections, cache, STS calls, reloads, quotas, logs, audit.

This is the only module that defines metrics.  Each broker gets its own
registry (no global state), rendered at ``/metrics`` in the Prometheus text
format.  Labels never carry caller input beyond route names, error codes and
Redis operation names, so cardinality stays bounded and nothing secret leaks.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from broker import log_writer
from broker.errors import BrokerError

if TYPE_CHECKING:  # the chain imports metrics; metrics only reads the cache at scrape time
    from broker.credentials.cache import CredentialCache

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5)

_In = TypeVar("_In")
_Out = TypeVar("_Out")


class _CacheCollector(Collector):
    """Reads the cache's own counters at scrape time (no work on the hot path)."""

    def __init__(self, cache: CredentialCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[Metric]:
        stats = self._cache.stats
        counters = {
            "hits": ("Requests served from the cache", stats.hits),
            "misses": ("Requests that found no usable entry", stats.misses),
            "forced_refreshes": ("Fetches forced by min_ttl", stats.forced_refreshes),
            "background_refreshes": (
                "Refreshes started ahead of expiry",
                stats.background_refreshes,
            ),
            "refresh_failures": ("Background refreshes that failed", stats.refresh_failures),
            "evictions": ("Entries evicted by max_entries", stats.evictions),
            "fetches": ("Fetches started (concurrent misses share one)", stats.fetches),
        }
        for name, (help_text, value) in counters.items():
            yield CounterMetricFamily(f"broker_cache_{name}", help_text, value=value)
        yield GaugeMetricFamily(
            "broker_cache_entries", "Entries in the cache", value=len(self._cache)
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _LogCollector(Collector):
    """The log writer's dropped lines and backlog, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "broker_log_lines_dropped",
            "Log lines dropped because the log stream (stderr) was blocked or too slow",
            value=log_writer.lines_dropped(),
        )
        yield GaugeMetricFamily(
            "broker_log_buffer_bytes",
            "Log output waiting for the writer thread",
            value=log_writer.buffered_bytes(),
        )

    def describe(self) -> Iterator[Metric]:
        return iter(())


class _Requests(Collector):
    """``broker_requests_total`` and ``broker_request_duration_seconds``, counted by the loop.

    What prometheus_client's ``Counter`` and ``Histogram`` with these labels
    export, to the byte (``_created`` included; tests/test_metrics.py compares
    them), for a dict update per request instead of three locked updates and
    two label lookups.  Only the event loop's thread counts requests, and a
    scrape runs on that loop too, so no lock is needed.  Both labels are
    bounded (route names, HTTP statuses), so the maps are too.
    """

    def __init__(self) -> None:
        self._counts: dict[tuple[str, int], list[float]] = {}  # → [count, created]
        self._latency: dict[str, list[float]] = {}  # → per bucket, +Inf, sum, created

    def count(self, route: str, status: int) -> None:
        """Count one request by ``route`` answered with ``status`` (its latency not observed)."""
        counted = self._counts.get((route, status))
        if counted is None:
            counted = self._counts[(route, status)] = [0.0, time.time()]
        counted[0] += 1

    def finished(self, route: str, status: int, seconds: float) -> None:
        """Count one request and observe its latency."""
        self.count(route, status)
        latency = self._latency.get(route)
        if latency is None:
            latency = self._latency[route] = [0.0] * (len(_LATENCY_BUCKETS) + 2) + [time.time()]
        latency[bisect.bisect_left(_LATENCY_BUCKETS, seconds)] += 1
        latency[-2] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = Metric("broker_requests", "HTTP requests by route and status", "counter")
        for (route, status), (count, created) in self._counts.items():
            labels = {"route": route, "status": str(status)}
            requests.add_sample("broker_requests_total", labels, count)
            requests.add_sample("broker_requests_created", labels, created)
        yield requests
        name = "broker_request_duration_seconds"
        latency = Metric(name, "HTTP request latency by route", "histogram")
        for route, values in self._latency.items():
            cumulative = 0.0
            for bound, count in zip(_BOUND_TEXTS, values, strict=False):
                cumulative += count
                latency.add_sample(f"{name}_bucket", {"le": bound, "route": route}, cumulative)
            latency.add_sample(f"{name}_count", {"route": route}, cumulative)
            latency.add_sample(f"{name}_sum", {"route": route}, values[-2])
            latency.add_sample(f"{name}_created", {"route": route}, values[-1])
        yield latency

    def describe(self) -> Iterator[Metric]:
        return iter(())


_go_text: Callable[[float], str] = floatToGoString  # as prometheus_client writes ``le``
_BOUND_TEXTS = (*(_go_text(bound) for bound in _LATENCY_BUCKETS), "+Inf")


class Metrics:
    """The broker's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = _Requests()
        r.register(self.requests)
        self.sts_calls = Counter(
            "broker_sts_calls",
            "AssumeRole calls by outcome (success or error code)",
            ["outcome"],
            registry=r,
        )
        self.sts_seconds = Histogram(
            "broker_sts_call_duration_seconds",
            "AssumeRole latency",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.reload_successful = Gauge(
            "broker_policies_last_reload_successful",
            "1 if the last policy (re)load worked",
            registry=r,
        )
        self.reload_timestamp = Gauge(
            "broker_policies_last_reload_timestamp_seconds",
            "When policies were last (re)loaded successfully",
            registry=r,
        )
        self.policies = Gauge("broker_policies_loaded", "Policies in force", registry=r)
        self.quota_rejections = Counter(
            "broker_quota_rejections",
            "Requests refused by a quota: caller_sts, caller_requests or sts_budget",
            ["kind"],
            registry=r,
        )
        self.stale_served = Counter(
            "broker_stale_credentials_served",
            "Credentials served from cache while STS failed to refresh them",
            registry=r,
        )
        self.shared_cache_degraded = Counter(
            "broker_shared_cache_degraded",
            "Redis operations that failed or were skipped, so STS or the local budget was used",
            ["operation"],
            registry=r,
        )
        self.connections_reaped = Counter(
            "broker_connections_reaped",
            "Connections closed because the client sent its request too slowly",
            ["reason"],
            registry=r,
        )
        self.audit_records = Counter(
            "broker_audit_records",
            "Audit records written, by event (credentials_issued, url_presigned, ...)",
            ["event"],
            registry=r,
        )
        self.audit_failures = Counter(
            "broker_audit_failures",
            "Audit records not written: write_error, buffer_full, timeout or closed",
            ["reason"],
            registry=r,
        )
        r.register(_LogCollector())

    def request_finished(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request and observe its latency."""
        self.requests.finished(route, status, seconds)

    def track_cache(self, cache: CredentialCache) -> None:
        """Export ``cache``'s counters and size."""
        self.registry.register(_CacheCollector(cache))

    def record_reload(self, *, successful: bool, at: float, policies: int | None = None) -> None:
        """Note a policy (re)load and its outcome; a failed one leaves the timestamp alone."""
        self.reload_successful.set(1 if successful else 0)
        if successful:
            self.reload_timestamp.set(at)
        if policies is not None:
            self.policies.set(policies)

    def instrument_sts(
        self, fetch: Callable[[_In], Awaitable[_Out]]
    ) -> Callable[[_In], Awaitable[_Out]]:
        """Wrap an AssumeRole function to count outcomes and time each call."""

        async def instrumented(request: _In) -> _Out:
            started = time.perf_counter()
            outcome = "success"
            try:
                return await fetch(request)
            except BrokerError as err:
                outcome = err.code
                raise
            except asyncio.CancelledError:  # cut short by the retry deadline: no answer came
                outcome = "UpstreamTimeout"
                raise
            finally:
                self.sts_calls.labels(outcome).inc()
                self.sts_seconds.observe(time.perf_counter() - started)

        return instrumented

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)
