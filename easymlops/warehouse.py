"""Where the dbt project and the DuckDB warehouse live, and how dbt is told about them."""

from __future__ import annotations

import json
import os
from pathlib import Path

import duckdb

from easymlops.settings import Settings

DBT_PROJECT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"


def dbt_env(settings: Settings) -> dict[str, str]:
    """Environment for dbt: absolute paths, so dbt's working directory does not matter."""
    settings.warehouse.parent.mkdir(parents=True, exist_ok=True)
    return {
        "EASYMLOPS_WAREHOUSE_PATH": str(settings.warehouse.resolve()),
        "EASYMLOPS_LAKE_ROOT": settings.lake,
    }


def dbt_vars(settings: Settings) -> str:
    return json.dumps({"lake_root": settings.lake, "holdout_days": settings.holdout_days})


def export_dbt_env(settings: Settings) -> None:
    os.environ.update(dbt_env(settings))


def connect(settings: Settings, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to the warehouse; dbt holds the write lock only while it runs."""
    return duckdb.connect(str(settings.warehouse), read_only=read_only)


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
