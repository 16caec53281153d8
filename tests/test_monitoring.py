"""deploy/monitoring/: alert rules promtool accepts and tests, a dashboard on real metric names."""

from __future__ import annotations

import base64
import json
import re
import secrets
import shutil
import subprocess
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from broker.config import Settings
from tests.conftest import REPO, BrokerFactory, BrokerHarness, free_port

MONITORING = REPO / "deploy" / "monitoring"
ALERTS = MONITORING / "alerts.yaml"
ALERT_TESTS = MONITORING / "alerts.test.yaml"
DASHBOARD = MONITORING / "grafana-dashboard.json"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian package prometheus): tools/install-system-deps.sh",
)

PROMETHEUS_OWN = {"up"}
"""Series Prometheus writes itself for every target; never on the broker's /metrics."""
TARGET_LABELS = {"job", "instance"}
"""Labels Prometheus adds at scrape time."""
PENDING = {"broker_audit_failures_total": ("added by the audit feature (issue 13 item 2)", "audit")}
"""Metrics the rules and dashboard use before the broker exports them: why, and the config
section whose arrival means that feature has landed (and the metric must then be there)."""

GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$job": ".*", "$instance": ".*"}


@dataclass(frozen=True)
class Selector:
    """One vector selector in a PromQL expression: a metric name and its label matchers."""

    metric: str
    matchers: tuple[tuple[str, str, str], ...]  # (label, operator, value)


_IDENT = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(
    rf'(?P<string>"(?:[^"\\]|\\.)*")|(?P<range>\[[^\]]*\])'
    rf"|(?<![\w.:])(?P<name>{_IDENT})\s*(?P<braces>\{{[^}}]*\}})?(?P<call>\s*\()?"
)
_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "group_left", "group_right", "inf", "nan"}


def selectors(expr: str) -> list[Selector]:
    """Every metric an expression reads (functions, keywords and grouping labels left out)."""
    found = []
    for token in _TOKEN.finditer(_GROUPING.sub(" ", expr)):
        name = token["name"]
        if name is None or token["call"] is not None or name in _KEYWORDS:
            continue
        matchers = tuple(_MATCHER.findall(token["braces"] or ""))
        found.append(Selector(name, matchers))
    return found


def _grafana_to_promql(expr: str) -> str:
    for variable in sorted(GRAFANA_VARIABLES, key=len, reverse=True):
        expr = expr.replace(variable, GRAFANA_VARIABLES[variable])
    return expr


def _alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load(ALERTS.read_text())
    return [rule for group in document["groups"] for rule in group["rules"]]


def _dashboard() -> dict[str, Any]:
    return dict(json.loads(DASHBOARD.read_text()))


def _dashboard_exprs() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable, variables filled in."""
    board = _dashboard()
    exprs = [
        (f"panel {panel['id']} {target['refId']}", _grafana_to_promql(target["expr"]))
        for panel in board["panels"]
        for target in panel.get("targets", [])
    ]
    for variable in board["templating"]["list"]:
        query = variable.get("definition", "")
        call = re.fullmatch(r"label_values\((.*), *\w+\)", query)
        if call is not None:  # Grafana's label_values(SELECTOR, LABEL): check the selector
            exprs.append((f"variable {variable['name']}", _grafana_to_promql(call[1])))
    return exprs


def _all_exprs() -> list[tuple[str, str]]:
    rules = [(f"alert {rule['alert']}", str(rule["expr"])) for rule in _alert_rules()]
    return rules + _dashboard_exprs()


def _promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run(  # noqa: S603 - promtool from PATH, fixed arguments
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd, check=False
    )


def test_selectors_find_metrics_and_matchers_not_functions_or_labels() -> None:
    """The PromQL reader used here: metrics and matchers in, functions and by-labels out."""
    expr = (
        'histogram_quantile(0.99, sum by (job, le) (rate(a_bucket{x="1", y=~"p|q"}[5m])))'
        ' / on(job) group_left b_total > bool 0.5 and absent(up{job="j"}) or time() - c'
    )
    assert selectors(expr) == [
        Selector("a_bucket", (("x", "=", "1"), ("y", "=~", "p|q"))),
        Selector("b_total", ()),
        Selector("up", (("job", "=", "j"),)),
        Selector("c", ()),
    ]


@needs_promtool
def test_alert_rules_pass_promtool_check() -> None:
    """promtool check rules accepts deploy/monitoring/alerts.yaml (syntax, PromQL, templates)."""
    result = _promtool("check", "rules", ALERTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(_alert_rules())} rules found" in result.stdout


@needs_promtool
def test_alert_rule_unit_tests_pass() -> None:
    """promtool test rules: every alert fires on its input series and stays quiet on the others."""
    result = _promtool("test", "rules", ALERT_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    """alerts.test.yaml holds, for each alert, a case where it fires and one where it must not."""
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (firing if check["exp_alerts"] else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in _alert_rules()}
    assert names - firing == set()
    assert names - quiet == set()


def test_every_alert_has_severity_summary_and_description() -> None:
    """Each rule is routable (severity) and says what happened and what to do."""
    for rule in _alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        assert {"summary", "description"} <= set(rule["annotations"]), rule["alert"]


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every panel query and variable, Grafana variables filled in, passes promtool as a rule."""
    rules = [
        {"record": f"dashboard:query_{index}", "expr": expr}
        for index, (_, expr) in enumerate(_dashboard_exprs())
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = _promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_is_a_well_formed_grafana_dashboard() -> None:
    """Unique ids, panels on the 24-column grid, every query on the chosen data source."""
    board = _dashboard()
    assert (board["uid"], board["title"]) == ("oss-sts-broker", "oss-sts-broker")
    variables = {variable["name"] for variable in board["templating"]["list"]}
    assert variables == {"datasource", "job", "instance"}
    ids = [panel["id"] for panel in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in board["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
            used = set(re.findall(r"\$(\w+)", target["expr"])) - {"__rate_interval", "__range"}
            assert used <= variables, panel["title"]


def test_dashboard_covers_what_operators_ask_about() -> None:
    """Requests, latency, cache, STS outcomes, rejections, stale serves, reloads and audit."""
    used = {selector.metric for _, expr in _dashboard_exprs() for selector in selectors(expr)}
    assert {
        "broker_requests_total",
        "broker_request_duration_seconds_bucket",
        "broker_cache_hits_total",
        "broker_cache_misses_total",
        "broker_sts_calls_total",
        "broker_sts_call_duration_seconds_bucket",
        "broker_quota_rejections_total",
        "broker_stale_credentials_served_total",
        "broker_policies_last_reload_successful",
        "broker_audit_failures_total",
    } <= used


@dataclass
class LiveMetrics:
    """What live brokers' /metrics showed: names (as PromQL sees them) and label values."""

    names: set[str]
    labels: dict[str, dict[str, set[str]]]  # metric -> label -> values seen


def _exposed_names(family: Any) -> Iterator[str]:
    """The names PromQL can select for one metric family, samples or not."""
    if family.type == "counter":
        yield f"{family.name}_total"
    elif family.type == "histogram":
        yield from (f"{family.name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
    else:
        yield family.name
    yield from (sample.name for sample in family.samples)


async def _scrape(broker: BrokerHarness, live: LiveMetrics) -> None:
    async with broker.client.get("/metrics") as reply:
        assert reply.status == 200
        text = await reply.text()
    for family in text_string_to_metric_families(text):
        live.names.update(_exposed_names(family))
        for sample in family.samples:
            for label, value in sample.labels.items():
                live.labels[sample.name].setdefault(label, set()).add(value)


async def _request(broker: BrokerHarness, method: str, path: str, **kwargs: Any) -> int:
    async with broker.client.request(method, path, **kwargs) as reply:
        await reply.read()
        return reply.status


async def _drive_every_kind(broker: BrokerHarness) -> None:
    """One request of each kind, and the failures the alerts watch for."""
    svc_a, alice = broker.auth("svc-a"), broker.auth("alice")
    presign = {"policy": "service-uploads", "key": "services/svc-a/report.csv", "method": "GET"}
    calls = [
        ("GET", "/v1/credentials/service-uploads", {"headers": svc_a}, 200),  # STS success
        ("POST", "/v1/presign", {"headers": svc_a, "json": presign}, 200),
        ("POST", "/v1/post-policy", {"headers": svc_a, "json": {"policy": "service-uploads"}}, 200),
        ("GET", "/v1/policies", {"headers": svc_a}, 200),
        ("GET", "/healthz", {}, 200),
        ("GET", "/readyz", {}, 200),
        ("GET", "/openapi.json", {}, 200),
        ("GET", "/v1/credentials/service-uploads", {}, 401),
        ("GET", "/v1/credentials/avatar-upload", {"headers": alice}, 503),  # STS budget spent
    ]
    for method, path, kwargs, status in calls:
        assert await _request(broker, method, path, **kwargs) == status, path
    broker.clock.advance(3600)  # the budget refills; STS now throttles
    broker.sts.emulator.faults.update({"throttle": True, "remaining": 1})
    status = await _request(broker, "GET", "/v1/credentials/avatar-upload", headers=alice)
    assert status == 503


def _redis_options(tmp_path: Path) -> dict[str, Any]:
    """A shared cache on a Redis nobody listens on: every operation degrades to STS."""
    key = base64.b64encode(secrets.token_bytes(32)).decode()
    keys = tmp_path / "cache-keys.json"
    keys.write_text(json.dumps({"active": "k1", "keys": {"k1": key}}))
    redis = {"url": f"redis://127.0.0.1:{free_port()}/0", "encryption_keys_file": str(keys)}
    return {"backend": "redis", "redis": redis}


@pytest.fixture
async def live(make_broker: BrokerFactory, tmp_path: Path) -> LiveMetrics:
    """/metrics of a broker driven through every request kind, and of one on a failing Redis."""
    seen = LiveMetrics(set(), defaultdict(dict))
    budget = {"sts_calls_per_second": 0.001, "sts_burst": 1, "sts_max_wait_seconds": 0}
    local = await make_broker(quotas=budget)
    await _drive_every_kind(local)
    await _scrape(local, seen)
    shared = await make_broker(cache=_redis_options(tmp_path))
    status = await _request(
        shared, "GET", "/v1/credentials/service-uploads", headers=shared.auth("svc-a")
    )
    assert status == 200
    await _scrape(shared, seen)
    return seen


async def test_every_metric_in_rules_and_dashboard_exists_on_live_metrics(
    live: LiveMetrics,
) -> None:
    """Each metric a rule or panel names is on a live /metrics (histograms: _bucket/_sum/_count)."""
    used: dict[str, set[str]] = defaultdict(set)
    for where, expr in _all_exprs():
        for selector in selectors(expr):
            used[selector.metric].add(where)
    missing = {name: sorted(places) for name, places in used.items() if name not in live.names}
    for name in PROMETHEUS_OWN:
        missing.pop(name, None)
    print(f"\nallowed to be missing until their feature lands: {PENDING}")
    for name, (_, section) in PENDING.items():
        assert name not in live.names, f"{name} is exported now: remove it from PENDING"
        landed = f"the config has {section!r} now but /metrics lacks {name}: export it"
        assert section not in Settings.model_fields, f"{landed}, or edit deploy/monitoring/"
        missing.pop(name, None)
    assert missing == {}


async def test_every_label_matcher_names_a_live_label_and_value(live: LiveMetrics) -> None:
    """Matchers use labels the metric has and values it takes (route, outcome, quota names)."""
    problems = []
    for where, expr in _all_exprs():
        for selector in selectors(expr):
            if selector.metric in PROMETHEUS_OWN or selector.metric in PENDING:
                continue
            labels = live.labels.get(selector.metric, {})
            for label, _, value in selector.matchers:
                if label in TARGET_LABELS:
                    continue
                if label not in labels:
                    problems.append(f"{where}: {selector.metric} has no label {label!r}")
                    continue
                if re.fullmatch(r"\w+(\|\w+)*", value):  # a literal or a list of literals
                    unseen = set(value.split("|")) - labels[label]
                    problems += [
                        f"{where}: {selector.metric}{{{label}={v!r}}} never seen" for v in unseen
                    ]
    assert problems == []
