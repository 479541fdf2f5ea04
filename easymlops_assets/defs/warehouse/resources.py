"""The dbt CLI resource used by the gold models."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import dagster as dg

from easymlops.settings import Settings, get_settings
from easymlops.warehouse import DBT_PROJECT_DIR
from easymlops_assets.dbt_specs import DbtManifest, DbtSelection

if TYPE_CHECKING:
    from easymlops_assets.dbt_run import DbtBuild


def dbt_executable(settings: Settings) -> str:
    """The dbt next to this interpreter (correct whether or not the virtualenv is on PATH), or
    the fork-server client beside it."""
    name = "easymlops-dbt" if settings.dbt_forkserver else "dbt"
    return str(Path(sys.executable).parent / name)


class DbtCli(dg.ConfigurableResource):
    """Where dbt runs: the project and the executable. A step builds dagster-dbt's
    DbtCliResource from these when it runs dbt (easymlops_assets/dbt_run.py), so that loading
    the definitions imports neither dagster-dbt nor dbt-core."""

    project_dir: str = str(DBT_PROJECT_DIR)
    dbt_executable: str

    def build(
        self,
        context: dg.AssetExecutionContext,
        manifest: DbtManifest,
        selection: DbtSelection,
        args: Sequence[str],
    ) -> DbtBuild:
        # Imports dagster-dbt, and with it dbt-core: only a step that runs dbt pays for them.
        from easymlops_assets.dbt_run import dbt_build

        return dbt_build(
            context,
            project_dir=Path(self.project_dir),
            dbt_executable=self.dbt_executable,
            manifest=manifest,
            selection=selection,
            args=args,
        )


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources={"dbt": DbtCli(dbt_executable=dbt_executable(get_settings()))})
