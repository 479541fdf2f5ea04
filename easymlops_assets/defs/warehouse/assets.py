"""dbt gold models (staging -> intermediate -> marts -> feature tables -> training set) as
Dagster assets; dbt tests attached to models surface as asset checks."""

from collections.abc import Iterator
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets

from easymlops.settings import get_settings
from easymlops.warehouse import DBT_PROJECT_DIR, dbt_vars, export_dbt_env, row_counts

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
# Under `dagster dev` this runs `dbt parse` when the manifest is missing; elsewhere the manifest
# is prepared beforehand (`make`, `easymlops demo`, tests) and never parsed at import.
dbt_project.prepare_if_dev()


class WarehouseTranslator(DagsterDbtTranslator):
    def get_asset_spec(self, manifest, unique_id, project):  # type: ignore[no-untyped-def]
        return (
            super()
            .get_asset_spec(manifest, unique_id, project)
            .replace_attributes(group_name="warehouse")
        )


@dbt_assets(
    manifest=dbt_project.manifest_path,
    project=dbt_project,
    dagster_dbt_translator=WarehouseTranslator(),
)
def gold_models(context: dg.AssetExecutionContext, dbt: DbtCliResource) -> Iterator[Any]:
    settings = get_settings()
    export_dbt_env(settings)
    # dbt holds DuckDB's write lock while it runs, so row counts are read after it finishes
    # (dagster-dbt's fetch_row_counts would keep a read-write connection open in this process).
    events = list(dbt.cli(["build", "--vars", dbt_vars(settings)], context=context).stream())
    names = {
        e.output_name: context.asset_key_for_output(e.output_name).path[-1]
        for e in events
        if isinstance(e, dg.Output)
    }
    counts = row_counts(settings, list(names.values()))
    for event in events:
        if isinstance(event, dg.Output) and names[event.output_name] in counts:
            count = counts[names[event.output_name]]
            event = event.with_metadata({**event.metadata, "dagster/row_count": count})
        yield event
