"""Prometheus metrics: requests, connections, cache, STS calls, reloads, quotas, logs, audit.

This is the only module that defines metrics.  Each broker gets its own
registry (no global state), rendered at ``/metrics`` in the Prometheus text
format.  Labels never carry caller input beyond route names, error codes and
Redis operation names, so cardinality stays bounded and nothing secret leaks.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

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


class Metrics:
    """The broker's metrics, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._finished: dict[tuple[str, int], tuple[Counter, Histogram]] = {}
        self.requests = Counter(
            "broker_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "broker_request_duration_seconds",
            "HTTP request latency by route",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
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
        """Count one answered request and observe its latency.

        The label children are bound once per (route, status) and reused: both
        labels are bounded (route names, HTTP statuses), so this map is too.
        """
        children = self._finished.get((route, status))
        if children is None:
            children = (
                self.requests.labels(route, str(status)),
                self.request_seconds.labels(route),
            )
            self._finished[(route, status)] = children
        children[0].inc()
        children[1].observe(seconds)

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
