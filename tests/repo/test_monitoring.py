"""deploy/grafana/ and deploy/prometheus/: the alerting rules pass `promtool check rules` and
their unit tests (`promtool test rules`), the dashboard is a Grafana dashboard one can
import, and every metric either of them names is one the service exports (read from
dispatcher/metrics.py's registry now, not from a list kept by hand)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY

import dispatcher.metrics  # noqa: F401  (registers the service's metrics)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dispatcher.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="no promtool: it comes with Debian's prometheus package, "
    "`apt-get install -y --no-install-recommends prometheus` (.ci/run does)",
)
# the series names each kind of metric exports (prometheus-client's, OpenMetrics')
SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
}
# Grafana's own variables, as Prometheus would see them once Grafana replaced them
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h"}


def exported() -> set[str]:
    """Every series name this process's registry exports (labelled families included, whose
    samples appear only once used)."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def metric_names(node: Any) -> Iterator[str]:
    """The metric names a parsed PromQL expression selects."""
    kind = type(node).__name__
    if kind == "VectorSelector":
        yield node.name
    elif kind == "MatrixSelector":
        yield from metric_names(node.vector_selector)
    elif kind == "BinaryExpr":
        yield from metric_names(node.lhs)
        yield from metric_names(node.rhs)
    elif kind == "Call":
        for arg in node.args:
            yield from metric_names(arg)
    elif kind in ("AggregateExpr", "ParenExpr", "UnaryExpr", "SubqueryExpr"):
        yield from metric_names(node.expr)
        if kind == "AggregateExpr" and node.param is not None:
            yield from metric_names(node.param)


def rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    found: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return found


def dashboard_exprs() -> list[str]:
    exprs = []
    for panel in dashboard()["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            exprs.append(expr)
    return exprs


@needs_promtool
def test_the_rules_pass_promtool_check() -> None:
    assert PROMTOOL is not None
    command = [PROMTOOL, "check", "rules", str(RULES)]
    checked = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert f"SUCCESS: {len(rules())} rules found" in checked.stdout


@needs_promtool
def test_the_main_alerts_pass_their_unit_tests() -> None:
    assert PROMTOOL is not None
    command = [PROMTOOL, "test", "rules", RULE_TESTS.name]
    tested = subprocess.run(
        command, cwd=RULE_TESTS.parent, capture_output=True, text=True, timeout=60, check=False
    )
    assert tested.returncode == 0, tested.stdout + tested.stderr
    covered = set(re.findall(r"alertname: (\w+)", RULE_TESTS.read_text()))
    main = ["QueueBehind", "FailureRatioHigh", "NoLiveWorker", "RedisUnreachable"]
    main += ["RedisNearlyFull", "HistoryBacklog", "WorkerHeartbeatStale"]
    main += ["QueueStalled", "ProjectBacklogOld"]
    assert {f"Dispatcher{name}" for name in main} <= covered


def test_every_rule_has_a_severity_and_says_what_to_do() -> None:
    for rule in rules():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
    # the slot a later issue fills: blocked ordering lanes
    assert "DispatcherLaneBlocked" in RULES.read_text()


def test_every_metric_the_dashboard_and_the_rules_name_is_exported() -> None:
    names = exported()
    assert "dispatcher_deliveries_total" in names and "process_cpu_seconds_total" in names
    used: dict[str, str] = {}
    for expr in [rule["expr"] for rule in rules()] + dashboard_exprs():
        for name in metric_names(promql_parser.parse(expr)):
            used[name] = expr
    unknown = {name: expr for name, expr in used.items() if name not in names}
    assert unknown == {}, f"not exported by dispatcher/metrics.py: {unknown}"
    assert len(used) > 20


def test_the_checker_finds_a_misspelt_metric() -> None:
    """The walk reaches selectors under every kind of node, so a typo cannot hide."""
    expr = "sum by (le) (rate(dispatcher_typo_bucket[5m])) / -(x_total offset 5m) > on() y"
    assert set(metric_names(promql_parser.parse(expr))) == {
        "dispatcher_typo_bucket",
        "x_total",
        "y",
    }
    assert "dispatcher_typo_bucket" not in exported()


def test_the_dashboard_imports_into_grafana() -> None:
    board = dashboard()
    assert board["uid"] and board["title"] and board["schemaVersion"] >= 36
    (source,) = board["templating"]["list"]
    assert (source["type"], source["query"]) == ("datasource", "prometheus")
    panels = board["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for target in panel.get("targets", []):
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert target["refId"] and target["expr"]


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    exprs = " ".join(dashboard_exprs())
    for metric in (
        "dispatcher_deliveries_total",  # rate by outcome
        "dispatcher_delivery_attempt_seconds_bucket",  # latency
        "dispatcher_queue_depth",
        "dispatcher_queue_oldest_job_age_seconds",
        "dispatcher_retries_total",
        "dispatcher_dead_letters_total",
        "dispatcher_callbacks_disabled_total",
        "dispatcher_history_backlog",
        "dispatcher_worker_heartbeat_timestamp_seconds",  # per-worker health
        "dispatcher_pending_writes",
        "dispatcher_workers_live",
        "dispatcher_redis_up",
    ):
        assert metric in exprs, metric
    assert "sum by (outcome)" in exprs and "histogram_quantile(0.99" in exprs


def test_the_series_alerts_count_increases_of_exist_from_the_start() -> None:
    """A fresh process exports each labelled counter an alert reads with `increase()` at 0
    (`DispatcherKeptBodiesLost`, `DispatcherJobsDropped`, `DispatcherCallbacksDisabled`,
    `DispatcherRedisFull`): a series first seen at 1 shows no increase, and the alert on
    the first such event never fired (review). In a process of its own: the tests' own
    counts would hide it here."""
    exported = subprocess.run(
        [sys.executable, "-c", "import dispatcher.metrics, prometheus_client as p; "
         "print(p.generate_latest().decode())"],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    for series in (
        'dispatcher_deliveries_dropped_total{reason="body"} 0.0',
        'dispatcher_deliveries_dropped_total{reason="job"} 0.0',
        'dispatcher_callbacks_disabled_total{reason="failing"} 0.0',
        'dispatcher_callbacks_disabled_total{reason="gone"} 0.0',
        'dispatcher_redis_full_total{refused="write"} 0.0',
    ):
        assert series in exported, series
