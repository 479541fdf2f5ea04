"""Where the dbt project and the DuckDB warehouse live, and how dbt is told about them."""

from __future__ import annotations

import json
import os
from datetime import date
from pathlib import Path

import duckdb

from easymlops import s3
from easymlops.settings import Settings

DBT_PROJECT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"


def dbt_env(settings: Settings) -> dict[str, str]:
    """Environment for dbt: absolute paths, so dbt's working directory does not matter; for a
    lake on S3 also the DuckDB extensions and S3 secret that profiles.yml gives dbt-duckdb (S3
    endpoint and keys: the AWS_* variables of the environment)."""
    settings.warehouse.parent.mkdir(parents=True, exist_ok=True)
    env = {
        "EASYMLOPS_WAREHOUSE_PATH": str(settings.warehouse.resolve()),
        "EASYMLOPS_LAKE_ROOT": settings.lake,
    }
    return env | (s3.duckdb_dbt_env() if s3.is_s3(settings.lake) else {})


def dbt_vars(settings: Settings, window: tuple[date, date] | None = None) -> str:
    """--vars of a dbt run; `window` (first, last date, inclusive) restricts the daily
    partitioned models (tag:daily) to those dates."""
    values: dict[str, object] = {
        "lake_root": settings.lake,
        "holdout_days": settings.holdout_days,
        "session_timeout_seconds": settings.session_timeout_seconds,
    }
    if window is not None:
        values.update(min_date=window[0].isoformat(), max_date=window[1].isoformat())
    return json.dumps(values)


def export_dbt_env(settings: Settings) -> None:
    os.environ.update(dbt_env(settings))


def connect(settings: Settings, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to the warehouse; dbt holds the write lock only while it runs. With the lake
    on S3 it can read S3, as the staging views over silver do."""
    con = duckdb.connect(str(settings.warehouse), read_only=read_only)
    if s3.is_s3(settings.lake):
        s3.enable_duckdb_s3(con)
    return con


def prepare_manifest() -> Path:
    """Run `dbt parse` so `target/manifest.json` exists (Dagster builds the dbt assets from it).

    Called by `make`, the CLI and tests before the definitions load, never at import time."""
    from dbt.cli.main import dbtRunner

    result = dbtRunner().invoke(
        [
            "parse",
            "--project-dir",
            str(DBT_PROJECT_DIR),
            "--profiles-dir",
            str(DBT_PROJECT_DIR),
            "--quiet",
        ]
    )
    if not result.success:
        raise RuntimeError(f"dbt parse failed: {result.exception}")
    return DBT_PROJECT_DIR / "target" / "manifest.json"


def row_counts(settings: Settings, tables: list[str]) -> dict[str, int]:
    """Rows per table (or view) of the warehouse; names not found are left out."""
    with connect(settings) as con:
        existing = {
            row[0]
            for row in con.execute("select table_name from information_schema.tables").fetchall()
        }
        counts = {}
        for name in tables:
            if name in existing:
                row = con.execute(f'select count(*) from "{name}"').fetchone()
                counts[name] = int(row[0]) if row else 0
        return counts


def row_counts_by_date(
    settings: Settings, table: str, first: date, last: date, column: str = "event_date"
) -> dict[str, int]:
    """Rows per date of a daily partitioned table for the dates in [first, last]."""
    with connect(settings) as con:
        rows = con.execute(
            f'select cast("{column}" as varchar), count(*) from "{table}" '
            f'where "{column}" between ? and ? group by 1',
            [first, last],
        ).fetchall()
    return {day: int(count) for day, count in rows}
