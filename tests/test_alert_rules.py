"""The Prometheus alert rules (infra/prometheus/alerts.yml) run through promtool, the rule
engine of Prometheus itself (Debian's prometheus package, `make promtool`): they parse, and
infra/prometheus/alerts.test.yml's planted series make each alert fire or stay silent."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parent.parent / "infra" / "prometheus"


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    assert binary, "promtool comes from Debian's prometheus package: `make promtool`"
    return subprocess.run(
        [binary, *args], cwd=cwd, capture_output=True, text=True, timeout=120, check=False
    )


def test_rules_parse() -> None:
    done = promtool("check", "rules", "alerts.yml", cwd=RULES_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 15 rules found" in done.stdout


def test_every_alert_fires_on_planted_series_and_is_silent_on_healthy_ones() -> None:
    done = promtool("test", "rules", "alerts.test.yml", cwd=RULES_DIR)
    assert done.returncode == 0, done.stdout + done.stderr
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    names = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((RULES_DIR / "alerts.test.yml").read_text())["tests"]
    fired = {
        check["alertname"]
        for test in tests
        for check in test["alert_rule_test"]
        if check["exp_alerts"]
    }
    assert fired == names, names - fired


@pytest.mark.parametrize(
    ("alert", "expression_change"),
    [
        ("ValidatorInvalidRatioHigh", ("> 0.05", "> 0.5")),
        ("FlinkInvalidRatioHigh", ('destination="invalid"', 'destination="valid"')),
        ("FlinkJobRestarting", ("> 0", "> 1")),
        ("FlinkJobRestarting", ("[15m]", "[5m]")),
        ("FlinkJobNotRunning", ("< 1", "< 0")),
        ("ServingErrorRateHigh", ('status=~"5.."', 'status=~"4.."')),
        ("ServingP99High", ("> 0.05", "> 0.5")),
        ("NoChampionServed", ("unless", "and")),
        # easymlops/platform_metrics.py's series
        ("ConsumerLagHigh", ("> 50000", "> 500000")),
        ("ConsumerStalled", ("== 0", ">= 0")),
        ("LandingStale", ("> 1800", "> 18000")),
        ("LandingStale", ("and on (topic)", "or on (topic)")),
        ("LandingStale", ('source="lake"', 'source="landing"')),
        ("FeatureDriftHigh", ('level="fail"', 'level="warn"')),
        ("LiveAucLow", (">= 100", ">= 0")),
        ("LiveAucLow", ("- on ()", "+ on ()")),
        ("PlatformMetricsSourceFailing", ("== 1", "== 0")),
    ],
)
def test_the_rule_tests_catch_a_broken_rule(
    tmp_path: Path, alert: str, expression_change: tuple[str, str]
) -> None:
    # The same tests against a copy of the rules where one alert is wrong must fail, naming it.
    rules = yaml.safe_load((RULES_DIR / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if rule["alert"] == alert:
                old, new = expression_change
                assert old in rule["expr"]
                rule["expr"] = rule["expr"].replace(old, new)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(rules))
    shutil.copy(RULES_DIR / "alerts.test.yml", tmp_path)
    done = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert done.returncode != 0
    assert re.search(rf"alertname: {alert}\b", done.stdout + done.stderr), done.stdout
