"""The `easymlops` command line against the real embedded stack."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import free_port
from typer.testing import CliRunner

from easymlops.cli import app
from easymlops.settings import Settings, get_settings
from easymlops.validate import run_validator

pytestmark = pytest.mark.services

FIXTURE_CSV = Path(__file__).parent / "fixtures" / "ecommerce_sample.csv"
runner = CliRunner()


def last_json(output: str) -> dict:
    """The JSON summary a command prints last."""
    return json.loads(output[output.rindex("\n{") :] if "\n{" in output else output)


def test_csv_replay_then_validate_until_idle(stack: Settings) -> None:
    run_validator(stack, idle_seconds=2)  # start from a drained raw topic

    produced = runner.invoke(app, ["produce", "--from-csv", str(FIXTURE_CSV)])
    assert produced.exit_code == 0, produced.output
    assert last_json(produced.stdout)["delivered"] == 31

    validated = runner.invoke(app, ["validate", "--until-idle", "--idle-seconds", "2"])
    assert validated.exit_code == 0, validated.output
    summary = last_json(validated.stdout)
    assert summary["consumed"] == 31
    assert (summary["valid"], summary["invalid"]) == (29, 2)
    assert summary["errors"] == {"wrong_type": 1, "missing_field": 1}


def test_status_json_lists_every_service_with_its_url(stack: Settings) -> None:
    result = runner.invoke(app, ["status", "--json"])
    assert result.exit_code == 0, result.output
    services = {s["name"]: s for s in json.loads(result.stdout)}
    for name in ("kafka", "redis", "mlflow", "ray"):
        assert services[name]["state"] == "running"
    assert services["mlflow"]["url"] == stack.mlflow_uri


def test_csv_with_a_foreign_header_is_refused(stack: Settings, tmp_path: Path) -> None:
    bad = tmp_path / "other.csv"
    bad.write_text("time,kind,item\n2019-10-01 00:00:00 UTC,view,1\n")
    result = runner.invoke(app, ["produce", "--from-csv", str(bad)])
    assert result.exit_code == 1
    assert "missing column" in result.output and "user_id" in result.output


def test_unreachable_broker_is_a_one_line_error(
    stack: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EASYMLOPS_KAFKA_PORT", str(free_port()))
    get_settings.cache_clear()
    try:
        result = runner.invoke(app, ["produce", "--events", "10"])
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 1
    assert "cannot reach Kafka" in result.output
