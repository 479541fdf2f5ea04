"""The dbt CLI resource used by the gold models."""

import sys
from pathlib import Path

import dagster as dg
from dagster_dbt import DbtCliResource

from easymlops_assets.defs.warehouse.assets import dbt_project

# The dbt next to this interpreter: correct whether or not the virtualenv is on PATH.
DBT_EXECUTABLE = str(Path(sys.executable).parent / "dbt")


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(
        resources={"dbt": DbtCliResource(project_dir=dbt_project, dbt_executable=DBT_EXECUTABLE)}
    )
