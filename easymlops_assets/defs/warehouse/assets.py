"""dbt gold models (staging -> intermediate -> marts -> feature tables -> training set) as
Dagster assets; dbt tests attached to models surface as asset checks.

Three selections of the one dbt project, because a Dagster step cannot run both before and
after another step:
- gold_models: everything upstream of the daily models (unpartitioned: staging, sessions,
  dims, user/product feature history, whose rows' validity ends depend on later days);
- gold_daily_models: the models tagged `daily` (fct_cart_events), partitioned by event date;
  a run gets its dates as EASYMLOPS_DBT_MIN_DATE/_MAX_DATE (environment, not --vars: see
  macros/daily_window.sql) and a backfill of N dates is one run;
- gold_training_models: what reads the daily models (training_set), unpartitioned.
"""

from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import dagster as dg
from dagster_dbt import DagsterDbtTranslator, DbtCliResource, DbtProject, dbt_assets

from easymlops.warehouse import (
    DBT_PROJECT_DIR,
    dbt_vars,
    export_dbt_env,
    prepare_manifest,
    row_counts,
    row_counts_by_date,
)
from easymlops_assets.partitions import (
    daily_partitions,
    inclusive_window,
    per_partition_row_counts,
    single_run,
)
from easymlops_assets.resources import Warehouse

dbt_project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
# Under `dagster dev` the project is parsed when the code location loads (as dagster-dbt's
# `prepare_if_dev` does), but with dbt's runner in this interpreter: `prepare_if_dev` runs the
# `dbt` found on PATH, which is missing when `.venv/bin/dagster dev` runs without an activated
# virtualenv. Elsewhere the manifest is prepared beforehand (`make`, `easymlops demo`, tests).
if dbt_project.preparer.using_dagster_dev():
    prepare_manifest()

DAILY = "tag:daily"


class WarehouseTranslator(DagsterDbtTranslator):
    def get_asset_spec(self, manifest, unique_id, project):  # type: ignore[no-untyped-def]
        return (
            super()
            .get_asset_spec(manifest, unique_id, project)
            .replace_attributes(group_name="warehouse")
        )


def _dbt_build(
    context: dg.AssetExecutionContext,
    dbt: DbtCliResource,
    warehouse: Warehouse,
    window: tuple[date, date] | None = None,
) -> tuple[list[Any], dict[str, str]]:
    """Run `dbt build` for the step's selection on the warehouse's target (duckdb or postgres);
    returns its events and output -> table."""
    settings = warehouse.settings()
    export_dbt_env(settings, window)
    args = ["--target", warehouse.dbt_target, "--vars", dbt_vars(settings)]
    events = list(dbt.cli(["build", *args], context=context).stream())
    names = {
        e.output_name: context.asset_key_for_output(e.output_name).path[-1]
        for e in events
        if isinstance(e, dg.Output)
    }
    return events, names


def _with_row_counts(
    warehouse: Warehouse, events: list[Any], names: dict[str, str]
) -> Iterator[Any]:
    # dbt holds DuckDB's write lock while it runs, so row counts are read after it finishes
    # (dagster-dbt's fetch_row_counts would keep a read-write connection open in this process).
    counts = row_counts(warehouse.settings(), list(names.values()))
    for event in events:
        if isinstance(event, dg.Output) and names[event.output_name] in counts:
            count = counts[names[event.output_name]]
            event = event.with_metadata({**event.metadata, "dagster/row_count": count})
        yield event


def gold_selection(**selection: Any) -> Callable[..., dg.AssetsDefinition]:
    """@dbt_assets over one selection of the project. All have a single-run backfill policy,
    the unpartitioned ones too: a command-line range backfill (`dagster asset materialize
    --partition-range`) only runs selections whose assets all have one."""
    return dbt_assets(
        manifest=dbt_project.manifest_path,
        project=dbt_project,
        dagster_dbt_translator=WarehouseTranslator(),
        backfill_policy=single_run,
        **selection,
    )


@gold_selection(exclude=f"{DAILY}+")
def gold_models(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: Warehouse
) -> Iterator[Any]:
    events, names = _dbt_build(context, dbt, warehouse)
    yield from _with_row_counts(warehouse, events, names)


@gold_selection(select=DAILY, name="gold_daily_models", partitions_def=daily_partitions)
def gold_daily_models(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: Warehouse
) -> Iterator[Any]:
    settings = warehouse.settings()
    first, last = inclusive_window(context)
    events, names = _dbt_build(context, dbt, warehouse, (first, last))
    for event in events:
        if not isinstance(event, dg.Output):
            yield event
            continue
        table = names[event.output_name]
        counts = row_counts_by_date(settings, table, first, last)
        single = context.partition_keys[0] if len(context.partition_keys) == 1 else None
        extra = {"dagster/row_count": counts.get(single, 0)} if single else {}
        yield event.with_metadata(
            {**event.metadata, **extra, "rows_by_date": dg.MetadataValue.json(counts)}
        )
        yield from per_partition_row_counts(
            context, context.asset_key_for_output(event.output_name), counts
        )


@gold_selection(select=f"{DAILY}+", exclude=DAILY, name="gold_training_models")
def gold_training_models(
    context: dg.AssetExecutionContext, dbt: DbtCliResource, warehouse: Warehouse
) -> Iterator[Any]:
    events, names = _dbt_build(context, dbt, warehouse)
    yield from _with_row_counts(warehouse, events, names)
