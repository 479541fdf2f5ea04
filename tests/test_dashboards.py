"""Grafana dashboards and Prometheus alert rules ask only for metrics the platform exports, in
PromQL that Prometheus accepts: checked offline, against the metric declarations in the code
(serving/metrics.py's registry, the validator's OpenTelemetry instruments, the platform metrics
exporter's METRICS) and with promtool."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import yaml
from prometheus_client.metrics import MetricWrapperBase

from easymlops import flink_cluster, platform_metrics
from serving.metrics import ServingMetrics

ROOT = Path(__file__).resolve().parent.parent
DASHBOARDS = sorted((ROOT / "infra/grafana/dashboards").glob("*.json"))
ALERTS = ROOT / "infra/prometheus/alerts.yml"
# Series Prometheus itself adds to every scrape target.
BUILTIN = {"up"}
# What the OTel collector's Prometheus exporter appends for a unit (infra/otel/collector.yaml);
# {annotations} add nothing, "X/Y" becomes _X_per_Y.
OTEL_UNITS = {"s": "seconds", "ms": "milliseconds", "By": "bytes", "1": "ratio", "%": "percent"}
OTEL_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
OTEL_INSTRUMENT = re.compile(
    r"create_(counter|histogram|observable_gauge|up_down_counter)\(\s*"
    r'"(?P<name>[a-z0-9_.]+)"(?P<rest>[^)]*)\)',
    re.S,
)


def prometheus_client_names() -> set[str]:
    names = set()
    metrics = ServingMetrics()
    for value in vars(metrics).values():
        if not isinstance(value, MetricWrapperBase):
            continue
        base, kind = value._name, value._type
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
        names |= {base + s for s in suffixes.get(kind, [""])}
    return names


def platform_metric_names() -> set[str]:
    """Gauges of easymlops/platform_metrics.py (tests/test_platform_metrics.py checks that a
    scrape answers each of them)."""
    return set(platform_metrics.METRICS)


def exported_names() -> set[str]:
    # The Flink job's routing counter and the jobmanager's restart and running-job gauges:
    # tests/test_flink_kafka.py scrapes each from a real cluster.
    flink = {
        flink_cluster.ROUTED_EVENTS_METRIC,
        flink_cluster.RESTARTS_METRIC,
        flink_cluster.RUNNING_JOBS_METRIC,
    }
    return prometheus_client_names() | otel_names() | platform_metric_names() | flink | BUILTIN


def unit_suffix(unit: str) -> str:
    def word(part: str, names: dict[str, str]) -> str:
        part = re.sub(r"\{[^}]*\}", "", part)
        return names.get(part, part)

    numerator, _, denominator = unit.partition("/")
    words = [word(numerator, OTEL_UNITS)]
    if denominator:
        words += ["per", word(denominator, OTEL_PER_UNITS)]
    return "".join(f"_{w}" for w in words if w)


def otel_names() -> set[str]:
    names = set()
    for source in (ROOT / "easymlops").glob("*.py"):
        for match in OTEL_INSTRUMENT.finditer(source.read_text()):
            unit = re.search(r'unit="([^"]*)"', match["rest"])
            base = match["name"].replace(".", "_") + unit_suffix(unit[1] if unit else "")
            kind = match[1]
            if kind == "counter":
                names.add(base + "_total")
            elif kind == "histogram":
                names |= {base + s for s in ("_bucket", "_sum", "_count")}
            else:
                names.add(base)
    return names


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                yield f"{path.name}: {panel['title']}", target["expr"]


def alert_expressions() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(ALERTS.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"alerts.yml: {rule['alert']}", rule["expr"]


def metric_names(expression: str) -> set[str]:
    """Series names an expression selects: identifiers followed by { or [ or standing alone,
    minus PromQL's functions, keywords and label names."""
    without_strings = re.sub(r'"[^"]*"', '""', expression)
    without_labels = re.sub(r"\{[^}]*\}", "{}", without_strings)
    without_grouping = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", without_labels)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b(?!\s*\()", without_grouping))
    keywords = {"and", "or", "unless", "bool", "offset", "le", "inf", "Inf"}
    return {w for w in words if w not in keywords and not re.fullmatch(r"\d+[smhdw]", w)}


def test_the_dashboards_cover_the_stream_serving_lake_and_model() -> None:
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert {
        "EasyMLOps: stream validation",
        "EasyMLOps: serving",
        "EasyMLOps: lake",
        "EasyMLOps: model",
    } <= titles
    uids = [json.loads(p.read_text())["uid"] for p in DASHBOARDS]
    assert len(uids) == len(set(uids)), uids
    provisioning = yaml.safe_load(
        (ROOT / "infra/grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    uid = provisioning["datasources"][0]["uid"]
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            assert panel["datasource"]["uid"] == uid, (path.name, panel["title"])


def test_every_series_asked_for_is_exported_by_the_platform() -> None:
    exported = exported_names()
    assert "easymlops_validator_events_total" in exported
    assert "easymlops_serving_request_latency_seconds_bucket" in exported
    assert "easymlops_kafka_consumer_lag" in exported
    expressions = [*dashboard_expressions(), *alert_expressions()]
    assert len(expressions) > 10
    for where, expression in expressions:
        unknown = metric_names(expression) - exported
        assert not unknown, f"{where} asks for {sorted(unknown)}, which nothing exports"


def test_units_become_the_suffixes_the_collector_gives() -> None:
    assert unit_suffix("s") == "_seconds"
    assert unit_suffix("{event}") == ""
    assert unit_suffix("{event}/s") == "_per_second"
    assert "easymlops_validator_throughput_per_second" in otel_names()
    assert "easymlops_validator_throughput" not in otel_names()


def test_the_platform_metrics_are_all_on_a_dashboard() -> None:
    # Every gauge the exporter answers is shown somewhere (the exporter's own read timestamps
    # aside), and the lag is on the stream dashboard, as issue 14 asks.
    shown = {name for _, e in dashboard_expressions() for name in metric_names(e)}
    missing = platform_metric_names() - shown - {"easymlops_platform_scrape_timestamp_seconds"}
    assert not missing, missing
    stream = json.loads((ROOT / "infra/grafana/dashboards/stream.json").read_text())
    assert any(
        "easymlops_kafka_consumer_lag" in t["expr"] for p in stream["panels"] for t in p["targets"]
    )


def test_platform_metric_names_follow_the_unit_convention() -> None:
    # Seconds end in _seconds, like the OTel names the collector gives; counts have no suffix.
    for spec in platform_metrics.METRICS.values():
        assert spec.name.startswith("easymlops_"), spec.name
        mentions_seconds = "seconds" in spec.help.lower() or "unix time" in spec.help.lower()
        assert spec.name.endswith("_seconds") == mentions_seconds, spec.name


def test_the_name_check_finds_a_misspelt_metric() -> None:
    exported = exported_names()
    typo = 'sum(rate(easymlops_serving_request_total{status=~"5.."}[5m]))'
    assert metric_names(typo) - exported == {"easymlops_serving_request_total"}


def test_prometheus_parses_every_dashboard_expression(tmp_path: Path) -> None:
    # promtool has no expression checker: the expressions become recording rules it parses.
    rules = {
        "groups": [
            {
                "name": "dashboards",
                "rules": [
                    {"record": f"dashboard:expression_{i}", "expr": expression}
                    for i, (_, expression) in enumerate(dashboard_expressions())
                ],
            }
        ]
    }
    (tmp_path / "rules.yml").write_text(yaml.safe_dump(rules))
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes from Debian's prometheus package: `make promtool`"
    done = subprocess.run(
        [promtool, "check", "rules", "rules.yml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
