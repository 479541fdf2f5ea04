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

import os
from collections.abc import Callable, Iterator
from datetime import date
from typing import TYPE_CHECKING, Any

import dagster as dg

from easymlops.warehouse import (
    DBT_PROJECT_DIR,
    dbt_vars,
    export_dbt_env,
    prepare_manifest,
    row_counts,
    row_counts_by_date,
)
from easymlops_assets.dbt_specs import DbtManifest, DbtSelection
from easymlops_assets.defs.warehouse.resources import DbtCli
from easymlops_assets.partitions import (
    daily_partitions,
    inclusive_window,
    per_partition_row_counts,
    single_run,
)
from easymlops_assets.resources import Warehouse

if TYPE_CHECKING:
    from easymlops_assets.dbt_run import DbtBuild

# Under `dagster dev` the project is parsed when the code location loads (as dagster-dbt's
# `prepare_if_dev` does, and with dbt's runner in this interpreter rather than a `dbt` looked up
# on PATH). Elsewhere the manifest is prepared beforehand (`make`, `easymlops demo`, tests), and
# loading the definitions imports no dbt (dbt_specs.py).
if os.environ.get("DAGSTER_IS_DEV_CLI"):
    prepare_manifest()

manifest = DbtManifest(DBT_PROJECT_DIR / "target" / "manifest.json")
_daily = manifest.with_tag("daily")
_after_daily = manifest.descendants(_daily)
# dbt's `--exclude tag:daily+`, `--select tag:daily` and `--select tag:daily+ --exclude tag:daily`.
GOLD = manifest.selection(set(manifest.asset_ids()) - _daily - _after_daily)
GOLD_DAILY = manifest.selection(_daily)
GOLD_TRAINING = manifest.selection(_after_daily - _daily)


def _dbt_build(
    context: dg.AssetExecutionContext,
    dbt: DbtCli,
    warehouse: Warehouse,
    selection: DbtSelection,
    window: tuple[date, date] | None = None,
) -> tuple["DbtBuild", dict[str, str]]:
    """Run `dbt build` for the step's selection on the warehouse's target (duckdb or postgres);
    returns what it reported and output -> table."""
    settings = warehouse.settings()
    export_dbt_env(settings, window)
    args = ["--target", warehouse.dbt_target, "--vars", dbt_vars(settings)]
    build = dbt.build(context, manifest, selection, args)
    names = {
        e.output_name: context.asset_key_for_output(e.output_name).path[-1]
        for e in build.events
        if isinstance(e, dg.Output)
    }
    return build, names


def _with_row_counts(
    warehouse: Warehouse, build: "DbtBuild", names: dict[str, str]
) -> Iterator[Any]:
    # dbt holds DuckDB's write lock while it runs, so row counts are read after it finishes
    # (dagster-dbt's fetch_row_counts would keep a read-write connection open in this process).
    counts = row_counts(warehouse.settings(), list(names.values()))
    for event in build.events:
        if isinstance(event, dg.Output) and names[event.output_name] in counts:
            count = counts[names[event.output_name]]
            event = event.with_metadata({**event.metadata, "dagster/row_count": count})
        yield event
    build.raise_error()


def gold_selection(selection: DbtSelection, **kwargs: Any) -> Callable[..., dg.AssetsDefinition]:
    """A multi-asset over one selection of the project, subsettable like @dbt_assets. All have a
    single-run backfill policy, the unpartitioned ones too: a command-line range backfill
    (`dagster asset materialize --partition-range`) only runs selections whose assets all have
    one."""
    return dg.multi_asset(
        specs=selection.specs,
        check_specs=selection.check_specs,
        can_subset=True,
        backfill_policy=single_run,
        **kwargs,
    )


@gold_selection(GOLD, name="gold_models")
def gold_models(
    context: dg.AssetExecutionContext, dbt: DbtCli, warehouse: Warehouse
) -> Iterator[Any]:
    build, names = _dbt_build(context, dbt, warehouse, GOLD)
    yield from _with_row_counts(warehouse, build, names)


@gold_selection(GOLD_DAILY, name="gold_daily_models", partitions_def=daily_partitions)
def gold_daily_models(
    context: dg.AssetExecutionContext, dbt: DbtCli, warehouse: Warehouse
) -> Iterator[Any]:
    settings = warehouse.settings()
    first, last = inclusive_window(context)
    build, names = _dbt_build(context, dbt, warehouse, GOLD_DAILY, (first, last))
    for event in build.events:
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
    build.raise_error()


@gold_selection(GOLD_TRAINING, name="gold_training_models")
def gold_training_models(
    context: dg.AssetExecutionContext, dbt: DbtCli, warehouse: Warehouse
) -> Iterator[Any]:
    build, names = _dbt_build(context, dbt, warehouse, GOLD_TRAINING)
    yield from _with_row_counts(warehouse, build, names)
