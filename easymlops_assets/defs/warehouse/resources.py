"""The dbt CLI resource used by the gold models."""

import sys
from collections.abc import Sequence
from functools import cached_property
from importlib.metadata import version as installed_version
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource
from packaging import version

from easymlops.settings import Settings, get_settings
from easymlops_assets.defs.warehouse.assets import dbt_project


def dbt_executable(settings: Settings) -> str:
    """The dbt next to this interpreter (correct whether or not the virtualenv is on PATH), or
    the fork-server client beside it."""
    name = "easymlops-dbt" if settings.dbt_forkserver else "dbt"
    return str(Path(sys.executable).parent / name)


class WarehouseDbt(DbtCliResource):
    """DbtCliResource without its `dbt --version` subprocess and in-process adapter per step.

    dagster-dbt runs `dbt --version` (a whole dbt start, ~3.5 s of CPU here) in every step
    process to learn whether the executable is dbt Core or dbt Fusion. dbt_executable() is the
    dbt Core of this virtualenv, so its version is the installed dbt-core's
    (tests/test_dbt.py compares both)."""

    @cached_property
    def _cli_version(self) -> version.Version:
        return version.Version(installed_version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:  # type: ignore[override]
        """No adapter in the step's process. dagster-dbt loads dbt's profile and project and
        registers the adapter in-process before each command (1-3 s per step here) only for
        its `fetch_row_counts`/`fetch_column_metadata`, which these assets do not use: they
        count rows themselves after dbt has released DuckDB's lock (assets.py)."""
        return None


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            # DbtCliResource's own __init__ (inherited) takes a DbtProject; mypy's pydantic
            # plugin types the subclass's from the field (str) instead.
            "dbt": WarehouseDbt(
                project_dir=dbt_project,  # type: ignore[arg-type]
                dbt_executable=dbt_executable(get_settings()),
            )
        }
    )
