"""Daily partitions through Dagster against the real broker, lake and dbt: events of three days
land once, a command-line backfill of the three dates records each date's exact row count with
every check passing, a 3-day backfill equals one run per date, the late-events sensor asks for
the dates a landing touched, and a crafted bad partition fails its blocking check so nothing
downstream of it runs. One topic pair, lake, warehouse and Dagster home of this module's own
(the session stack is shared)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import dagster as dg
import duckdb
import polars as pl
import pytest
from deltalake import write_deltalake
from test_lake_landing import produce_in_transaction

from easymlops import lake
from easymlops.generator import generate_payloads
from easymlops.kafka import ensure_topics
from easymlops.schema import validate_bytes
from easymlops.settings import Settings, get_settings
from easymlops.warehouse import prepare_manifest
from easymlops_assets.partitions import partition_range_tags

pytestmark = pytest.mark.services

# The three days before today, so that the lake is fresh (yesterday's partition exists).
TODAY = datetime.now(UTC).date()
D1, D2, D3 = (TODAY - timedelta(days=n) for n in (3, 2, 1))
DATES = [str(D1), str(D2), str(D3)]
BAD_DAY = str(TODAY - timedelta(days=5))


@dataclass
class Platform:
    settings: Settings
    definitions: dg.Definitions
    instance: dg.DagsterInstance
    expected_rows: dict[str, int]  # distinct validated events per event date


@pytest.fixture(scope="module")
def platform(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Platform]:
    base = tmp_path_factory.mktemp("partitions")
    suffix = uuid.uuid4().hex[:8]
    patch = pytest.MonkeyPatch()
    patch.setenv("EASYMLOPS_TOPIC_VALIDATED", f"test.partitions.validated.{suffix}")
    patch.setenv("EASYMLOPS_TOPIC_INVALID", f"test.partitions.invalid.{suffix}")
    patch.setenv("EASYMLOPS_LAKE_URI", str(base / "lake"))
    patch.setenv("EASYMLOPS_WAREHOUSE_PATH", str(base / "warehouse.duckdb"))
    patch.setenv("DAGSTER_HOME", str(base / "dagster"))
    (base / "dagster").mkdir()
    (base / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    get_settings.cache_clear()
    settings = get_settings()
    ensure_topics(settings)

    values = [
        validate_bytes(p).to_json_bytes()
        for p in generate_payloads(3000, days=3, seed=21, start=D1)
    ]
    # A producer retry: the same events again, which silver must count once.
    values += values[:50]
    produce_in_transaction(settings, settings.topic_validated, values)
    ids_by_date: dict[str, set[str]] = {}
    for value in values:
        event = json.loads(value)
        ids_by_date.setdefault(event["event_time"][:10], set()).add(event["event_id"])
    assert sorted(ids_by_date) == DATES

    prepare_manifest()
    from easymlops_assets.definitions import defs

    with dg.DagsterInstance.get() as instance:
        try:
            yield Platform(
                settings, defs(), instance, {d: len(ids) for d, ids in ids_by_date.items()}
            )
        finally:
            patch.undo()
            get_settings.cache_clear()


def run_job(
    platform: Platform, job: str, tags: dict[str, str] | None = None
) -> dg.ExecuteInProcessResult:
    return platform.definitions.resolve_job_def(job).execute_in_process(
        instance=platform.instance, raise_on_error=False, tags=tags or {}
    )


def latest_row_counts(instance: dg.DagsterInstance, asset: str) -> dict[str, int]:
    """dagster/row_count of each partition's latest materialization."""
    key = dg.AssetKey(asset)
    counts = {}
    for partition in instance.get_materialized_partitions(key):
        [record] = instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1
        ).records
        materialization = record.asset_materialization
        assert materialization is not None
        counts[partition] = int(materialization.metadata["dagster/row_count"].value)  # type: ignore[arg-type]
    return counts


def cart_events(settings: Settings) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(settings.warehouse), read_only=True) as con:
        return con.execute("select * from main.fct_cart_events order by event_id").fetchall()


def test_landing_twice_then_a_command_line_backfill_of_three_dates(platform: Platform) -> None:
    first = run_job(platform, "land_kafka")
    assert first.success
    [bronze] = [
        m
        for m in first.get_asset_materialization_events()
        if m.asset_key == dg.AssetKey("bronze_events")
    ]
    landed = bronze.materialization.metadata
    assert landed["dagster/row_count"].value == 3050
    assert landed["rows_by_date"].value == dict(  # type: ignore[attr-defined]
        Counter(
            str(t.date())
            for t in lake.read_bronze(lake.bronze_path(platform.settings, "events"))["event_time"]
        )
    )
    again = run_job(platform, "land_kafka")
    assert again.success
    [bronze_again] = [
        m
        for m in again.get_asset_materialization_events()
        if m.asset_key == dg.AssetKey("bronze_events")
    ]
    assert bronze_again.materialization.metadata["dagster/row_count"].value == 0

    # The README's command: one run materializes silver and the gold models for the 3 dates.
    command = [
        str(Path(sys.executable).parent / "dagster"),
        "asset",
        "materialize",
        "-m",
        "easymlops_assets.definitions",
        "--select",
        "silver_events,group:warehouse",
        "--partition-range",
        f"{D1}...{D3}",
    ]
    proc = subprocess.run(
        command, capture_output=True, text=True, timeout=900, env=dict(os.environ)
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]

    assert latest_row_counts(platform.instance, "silver_events") == platform.expected_rows
    carts = Counter(str(row[2]) for row in cart_events(platform.settings))
    assert latest_row_counts(platform.instance, "fct_cart_events") == dict(carts)
    [backfill_run] = platform.instance.get_run_records(limit=1)
    checks = {}
    for event in platform.instance.all_logs(
        backfill_run.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ):
        evaluation = event.get_dagster_event().asset_check_evaluation_data
        checks[f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"] = (
            evaluation.passed
        )
    assert checks["silver_events:silver_events_valid"] is True
    assert checks["silver_events:silver_reconciles_with_bronze"] is True
    assert len(checks) > 10 and all(checks.values()), checks


def test_a_three_day_backfill_equals_one_run_per_date(platform: Platform, tmp_path: Path) -> None:
    """The same dates built one partition per run, after the range run of the test above."""
    silver_by_range = lake.read_silver(platform.settings).sort("event_id")
    carts_by_range = cart_events(platform.settings)
    assert silver_by_range.height == sum(platform.expected_rows.values())
    for day in reversed(DATES):
        run = run_job(platform, "lakehouse_refresh", partition_range_tags(day, day))
        assert run.success
        checks = {
            e.asset_check_evaluation_data.check_name
            for e in run.all_events
            if e.event_type_value == "ASSET_CHECK_EVALUATION"
        }
        # The blocking checks ran; freshness (judging history, not this run) did not.
        assert {"silver_events_valid", "silver_reconciles_with_bronze"} <= checks
        assert not {c for c in checks if "freshness" in c}, checks
    assert lake.read_silver(platform.settings).sort("event_id").equals(silver_by_range)
    assert cart_events(platform.settings) == carts_by_range


def test_late_events_sensor_requests_the_dates_a_landing_touched(platform: Platform) -> None:
    from easymlops_assets.defs.lakehouse.sensors import late_events_sensor, refresh_window

    # The first tick sees every landing so far: the 3 days (and a day on each side).
    first = late_events_sensor(dg.build_sensor_context(instance=platform.instance))
    assert isinstance(first, dg.SensorResult) and first.run_requests and first.cursor
    [request] = first.run_requests
    assert isinstance(request, dg.RunRequest)
    assert request.tags == partition_range_tags(str(D1 - timedelta(days=1)), str(TODAY))
    # A late event of D1 lands: the next tick asks for D1 and its neighbours only.
    late = [
        validate_bytes(p).to_json_bytes() for p in generate_payloads(1, days=1, seed=99, start=D1)
    ]
    produce_in_transaction(platform.settings, platform.settings.topic_validated, late)
    assert run_job(platform, "land_kafka").success
    second = late_events_sensor(
        dg.build_sensor_context(instance=platform.instance, cursor=first.cursor)
    )
    assert isinstance(second, dg.SensorResult) and second.run_requests, second
    [request] = second.run_requests
    assert isinstance(request, dg.RunRequest)
    assert request.tags == partition_range_tags(str(D1 - timedelta(days=1)), str(D2))
    assert request.run_key != first.run_requests[0].run_key  # type: ignore[union-attr]
    # Nothing landed since: nothing to do.
    third = late_events_sensor(
        dg.build_sensor_context(instance=platform.instance, cursor=second.cursor)
    )
    assert isinstance(third, dg.SensorResult) and not third.run_requests
    assert refresh_window([str(D3)], "2019-10-01", str(D3)) == (str(D2), str(D3))
    assert refresh_window(["2019-10-01"], "2019-10-01", str(D3)) == ("2019-10-01", "2019-10-02")
    assert refresh_window([], "2019-10-01", str(D3)) is None


def test_a_bad_partition_fails_its_blocking_check_and_nothing_downstream_runs(
    platform: Platform,
) -> None:
    """Rows that bypassed validation (negative price, unknown type, a null session) written
    straight into bronze for one date: silver for that date is written, its blocking check
    fails naming the date, and the gold models of that run never start."""
    template = lake.read_bronze(lake.bronze_path(platform.settings, "events")).head(3)
    bad = template.with_columns(
        pl.Series("event_id", ["bad-1", "bad-2", "bad-3"]),
        pl.lit(datetime.fromisoformat(f"{BAD_DAY} 12:00:00")).alias("event_time"),
        pl.Series("price", [-5.0, 10.0, 10.0]),
        pl.Series("event_type", ["view", "teleport", "view"]),
        pl.Series("user_session", ["s-bad", "s-bad", None], dtype=pl.String),
        pl.lit(9).cast(pl.Int32).alias("kafka_partition"),
    )
    write_deltalake(lake.bronze_path(platform.settings, "events"), bad.to_arrow(), mode="append")
    before = cart_events(platform.settings)

    run = run_job(platform, "lakehouse_refresh", partition_range_tags(BAD_DAY, BAD_DAY))
    assert not run.success
    evaluations = {
        e.asset_check_evaluation_data.check_name: e.asset_check_evaluation_data
        for e in run.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    valid = evaluations["silver_events_valid"]
    assert valid.passed is False
    bad_dates: dict[str, dict[str, int]] = valid.metadata["bad_dates"].value  # type: ignore[assignment]
    assert list(bad_dates) == [BAD_DAY]
    assert bad_dates[BAD_DAY]["negative_prices"] == 1
    assert bad_dates[BAD_DAY]["unknown_event_types"] == 1
    assert bad_dates[BAD_DAY]["nulls"] == 1
    started = {e.step_key for e in run.all_events if e.event_type_value == "STEP_START"}
    assert "silver_events" in started
    assert not {s for s in started if s and s.startswith("gold_")}, started
    assert cart_events(platform.settings) == before
    assert BAD_DAY not in platform.instance.get_materialized_partitions(
        dg.AssetKey("fct_cart_events")
    )


def freshness(run: dg.ExecuteInProcessResult) -> dict[str, Any]:
    return {
        e.asset_check_evaluation_data.asset_key.to_user_string(): e.asset_check_evaluation_data
        for e in run.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }


def test_freshness_check_passes_on_this_lake_and_warns_on_an_empty_history(
    platform: Platform,
) -> None:
    """On this module's instance bronze landed minutes ago: fresh. On an instance that never
    landed: stale, as a WARN. Silver carries a freshness policy instead (see freshness.py)."""
    fresh = freshness(run_job(platform, "check_freshness"))
    assert fresh["bronze_events"].passed is True
    job = platform.definitions.resolve_job_def("check_freshness")
    with dg.DagsterInstance.ephemeral() as empty:
        stale = freshness(job.execute_in_process(instance=empty, raise_on_error=False))
    assert stale["bronze_events"].passed is False
    assert stale["bronze_events"].severity == dg.AssetCheckSeverity.WARN
    silver = platform.definitions.resolve_asset_graph().get(dg.AssetKey("silver_events"))
    assert silver.freshness_policy is not None
