"""The dbt CLI resource used by the gold models."""

import sys
from functools import cached_property
from importlib.metadata import version as installed_version
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource
from packaging import version

from easymlops_assets.defs.warehouse.assets import dbt_project

# The dbt next to this interpreter: correct whether or not the virtualenv is on PATH.
DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")


class WarehouseDbt(DbtCliResource):
    """DbtCliResource without its `dbt --version` subprocess per step.

    dagster-dbt runs `dbt --version` (a whole dbt start, ~3.5 s of CPU here) in every step
    process to learn whether the executable is dbt Core or dbt Fusion. DBT_EXECUTABLE is the dbt
    Core of this virtualenv, so its version is the installed dbt-core's
    (tests/test_dbt.py compares both)."""

    @cached_property
    def _cli_version(self) -> version.Version:
        return version.Version(installed_version("dbt-core"))


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={
            # DbtCliResource's own __init__ (inherited) takes a DbtProject; mypy's pydantic
            # plugin types the subclass's from the field (str) instead.
            "dbt": WarehouseDbt(
                project_dir=dbt_project,  # type: ignore[arg-type]
                dbt_executable=DBT_EXECUTABLE,
            )
        }
    )
