"""A same-day-history leak, planted in the real dbt project, is refused by the promotion gate.

Generated events (with the generator's ground truth) go through dbt twice: the project as it is,
and a copy whose user and product feature rows are valid on their own activity day
(`valid_from = activity_date`), so each cart's history includes the rest of its own day, its own
purchase among it. A model trained on each is registered in the real MLflow registry and judged
by `easymlops.promotion.evaluate`, as the Dagster check judges it: the leaky one scores above
the oracle (the true probabilities) and is refused as implausibly good; the honest one is not."""

from __future__ import annotations

import json
import shutil
from datetime import date
from pathlib import Path

import pytest
from conftest import write_silver_events
from test_dbt import PROJECT_DIR, dbt_env, run_dbt

from easymlops import promotion, registry, training, truth
from easymlops.generator import generate_events
from easymlops.schema import validate_record
from easymlops.settings import Settings

pytestmark = pytest.mark.services

# Fixed days: data relative to today would change every day (see conftest.E2E_FIRST_DAY).
EVENTS, DAYS, FIRST_DAY = 40_000, 6, date(2026, 11, 28)
VARS = {"holdout_days": 1, "session_timeout_seconds": 1800}
PARAMS = {"objective": "binary:logistic", "max_depth": 4, "eta": 0.05, "nthread": 2, "seed": 1}


def write_lake(lake: Path, home: Path) -> None:
    """Silver partitions of generated events, and their ground truth under `home`."""
    recorder = truth.TruthRecorder()
    events = [
        validate_record(e)
        for e in generate_events(EVENTS, days=DAYS, seed=21, start=FIRST_DAY, truth=recorder)
    ]
    write_silver_events(lake, events)
    recorder.write(Settings(home=home), "leak-gate")


def leaky_project(target: Path) -> Path:
    shutil.copytree(PROJECT_DIR, target, ignore=shutil.ignore_patterns("target", "logs"))
    for name, column in (
        ("user_features", "activity_date"),
        ("product_features", "cumulative.activity_date"),
    ):
        model = target / "models" / "features" / f"{name}.sql"
        sql = model.read_text()
        honest = f"{column} + 1 as valid_from,"
        assert honest in sql, name
        model.write_text(sql.replace(honest, f"{column} as valid_from,"))
    return target


def verdict(stack: Settings, base: Path, lake: Path, project: Path, name: str) -> str:
    warehouse, workdir = base / f"{name}.duckdb", base / f"work-{name}"
    workdir.mkdir()
    # run, not build: the leaky copy would (rightly) fail assert_point_in_time and stop here
    proc, _ = run_dbt(
        ["run", "--select", "+training_set", "--vars", json.dumps(VARS)],
        dbt_env(lake, warehouse, workdir),
        workdir,
        project,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    settings = stack.model_copy(
        update={
            "home": base,
            "warehouse_path": str(warehouse),
            "model_name": f"leak_gate_{name}",
            "gate_bootstrap": 300,
        }
    )
    data = training.load_training_data(settings)
    booster = training.fit(data.train, PARAMS, rounds=300)
    version = registry.log_and_register(booster, params={}, metrics={}, settings=settings).version
    return promotion.evaluate(settings, version).decision.description


def test_a_same_day_history_leak_is_refused_as_implausibly_good(
    stack: Settings, tmp_path: Path
) -> None:
    lake = tmp_path / "lake"
    write_lake(lake, tmp_path)
    leaky = verdict(stack, tmp_path, lake, leaky_project(tmp_path / "leaky_project"), "leaky")
    assert "implausibly good" in leaky and "above the oracle" in leaky, leaky
    honest = verdict(stack, tmp_path, lake, PROJECT_DIR, "honest")
    assert "implausibly good" not in honest, honest
