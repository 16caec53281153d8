"""broker/metrics.py: the request counters export what prometheus_client's own classes would."""

from __future__ import annotations

import re

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from broker.metrics import _LATENCY_BUCKETS, Metrics

_OBSERVED = [
    ("credentials", 200, 0.0004),
    ("credentials", 200, 0.0005),  # on a bound: that bucket
    ("credentials", 200, 0.00051),
    ("credentials", 403, 0.002),
    ("presign", 200, 0.3),
    ("credentials", 200, 7.5),  # past the last bound: +Inf only
    ("unmatched", 404, 0.0),
]
_CREATED = re.compile(rb"^(broker_request\S*_created\{[^}]*\}) \S+$", re.MULTILINE)


def _reference(observed: list[tuple[str, int, float]]) -> bytes:
    """The two request metrics as prometheus_client's Counter and Histogram export them."""
    registry = CollectorRegistry()
    requests = Counter(
        "broker_requests",
        "HTTP requests by route and status",
        ["route", "status"],
        registry=registry,
    )
    seconds = Histogram(
        "broker_request_duration_seconds",
        "HTTP request latency by route",
        ["route"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    for route, status, elapsed in observed:
        requests.labels(route, str(status)).inc()
        seconds.labels(route).observe(elapsed)
    requests.labels("unparsed", "400").inc()
    return generate_latest(registry)


def _ours(observed: list[tuple[str, int, float]]) -> bytes:
    metrics = Metrics()
    for route, status, elapsed in observed:
        metrics.request_finished(route, status, elapsed)
    metrics.requests.count("unparsed", 400)
    rendered = metrics.render()
    return rendered[: rendered.index(b"# HELP broker_sts_calls")]


def test_request_metrics_export_prometheus_clients_text() -> None:
    """Counts, buckets (bounds included), sums and series are byte-identical; _created too."""
    ours, reference = _ours(_OBSERVED), _reference(_OBSERVED)
    assert _CREATED.sub(rb"\1 T", ours) == _CREATED.sub(rb"\1 T", reference)
    assert len(_CREATED.findall(ours)) == 8  # one per (route, status) series, one per route


def test_no_request_answered_yet_exports_no_latency_sample() -> None:
    """With only an unparsed request counted, the latency family is there empty, as before."""
    assert _CREATED.sub(rb"\1 T", _ours([])) == _CREATED.sub(rb"\1 T", _reference([]))
