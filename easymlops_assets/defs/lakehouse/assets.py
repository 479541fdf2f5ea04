"""Lake layers: bronze lands Kafka topics exactly once; silver types, deduplicates, sessionizes."""

from collections.abc import Iterator
from datetime import timedelta

import dagster as dg
import polars as pl

from easymlops import lake
from easymlops.schema import EVENT_TYPES
from easymlops.settings import Settings
from easymlops_assets.partitions import (
    daily_partitions,
    per_partition_row_counts,
    single_run,
    window_dates,
)
from easymlops_assets.resources import PlatformConfig, Warehouse


class LandingConfig(dg.Config):
    """The range a landing run covers. The sensors set `until_offsets` (partition -> end offset
    to stop at, from the run key's range); without it a run lands everything up to the current
    end offsets. The start is always what the bronze table's Delta log recorded."""

    until_offsets: dict[str, int] | None = None


def _land(
    context: dg.AssetExecutionContext,
    config: LandingConfig,
    settings: Settings,
    topic: str,
    table: str,
    kind: str,
) -> dg.MaterializeResult:
    until = (
        None
        if config.until_offsets is None
        else {int(p): o for p, o in config.until_offsets.items()}
    )
    result = lake.land_topic(
        settings,
        topic,
        lake.bronze_path(settings, table),
        kind,
        until=until,
        progress=lambda n: context.log.debug(f"{topic}: {n} records read"),
    )
    context.log.info(
        f"landed {result.rows} records of {topic}, offsets {result.start_offsets} -> "
        f"{result.end_offsets} (delta version {result.delta_version})"
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "start_offsets": dg.MetadataValue.json(
                {str(p): o for p, o in result.start_offsets.items()}
            ),
            "end_offsets": dg.MetadataValue.json(
                {str(p): o for p, o in result.end_offsets.items()}
            ),
            "delta_version": result.delta_version,
            "path": lake.bronze_path(settings, table),
            # Read by the late-events sensor: the silver partitions this landing touched.
            "rows_by_date": dg.MetadataValue.json(result.rows_by_date),
        }
    )


@dg.asset(deps=["events_validated"], group_name="lakehouse", kinds={"delta", "polars"})
def bronze_events(
    context: dg.AssetExecutionContext, config: LandingConfig, platform: PlatformConfig
) -> dg.MaterializeResult:
    """Validated events landed from Kafka into a Delta table, with their partition and offset.
    Re-running lands only offsets not yet landed (row_count is what this run added)."""
    settings = platform.settings()
    return _land(context, config, settings, settings.topic_validated, "events", "validated")


@dg.asset(deps=["events_invalid"], group_name="lakehouse", kinds={"delta", "polars"})
def bronze_invalid_events(
    context: dg.AssetExecutionContext, config: LandingConfig, platform: PlatformConfig
) -> dg.MaterializeResult:
    """Dead-letter envelopes landed from Kafka, kept for inspection and replay."""
    settings = platform.settings()
    return _land(context, config, settings, settings.topic_invalid, "invalid_events", "invalid")


@dg.asset(deps=["predictions"], group_name="lakehouse", kinds={"delta", "polars"})
def bronze_predictions(
    context: dg.AssetExecutionContext, config: LandingConfig, platform: PlatformConfig
) -> dg.MaterializeResult:
    """Served predictions landed from Kafka, exactly once like events: what live performance and
    drift are computed from. Landed by `bronze_predictions_sensor` (running by default)."""
    settings = platform.settings()
    return _land(
        context, config, settings, settings.topic_predictions, "predictions", "predictions"
    )


@dg.asset_check(asset=bronze_events, blocking=True)
def bronze_events_offsets_unique(platform: PlatformConfig) -> dg.AssetCheckResult:
    """Exactly-once landing: no Kafka record (topic incarnation, partition, offset) appears
    twice in bronze."""
    frame = lake.read_bronze(lake.bronze_path(platform.settings(), "events"))
    record = ("kafka_topic_id", "kafka_partition", "kafka_offset")
    duplicates = frame.height - frame.select(record).n_unique()
    return dg.AssetCheckResult(
        passed=duplicates == 0, metadata={"rows": frame.height, "duplicate_offsets": duplicates}
    )


@dg.asset_check(asset=bronze_invalid_events, additional_deps=[bronze_events])
def invalid_ratio_below_threshold(platform: PlatformConfig) -> dg.AssetCheckResult:
    """Warns when more than 10% of all events landed were rejected: a producer is broken."""
    settings = platform.settings()
    valid = lake.read_bronze(lake.bronze_path(settings, "events")).height
    invalid_path = lake.bronze_path(settings, "invalid_events")
    invalid = (
        pl.read_delta(invalid_path).height if lake.DeltaTable.is_deltatable(invalid_path) else 0
    )
    ratio = invalid / (valid + invalid) if valid + invalid else 0.0
    return dg.AssetCheckResult(
        passed=ratio <= 0.10,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={"valid": valid, "invalid": invalid, "invalid_ratio": round(ratio, 4)},
    )


@dg.asset(
    deps=[bronze_events],
    group_name="lakehouse",
    kinds={"parquet", "polars"},
    partitions_def=daily_partitions,
    backfill_policy=single_run,
    # The late-events sensor rebuilds touched dates after every landing: a day without any
    # silver materialization means landing or the sensor stopped.
    freshness_policy=dg.FreshnessPolicy.time_window(
        fail_window=timedelta(hours=26), warn_window=timedelta(hours=25)
    ),
)
def silver_events(
    context: dg.AssetExecutionContext, warehouse: Warehouse
) -> Iterator[dg.AssetMaterialization | dg.MaterializeResult]:
    """Typed, deduplicated (by event_id), sessionized events, one Parquet file per event date.
    Each partition is rebuilt from the bronze events of its date and overwritten (idempotent);
    `dagster/row_count` is the partition's event count. With a PostgreSQL warehouse the dates
    are also loaded into its table lake.silver_events, the dbt source there (replaced per date:
    idempotent too); DuckDB's dbt reads the Parquet files themselves."""
    settings = warehouse.settings()
    first, end = window_dates(context)
    result = lake.build_silver(settings, first, end)
    loaded = warehouse.load_silver(first, end)
    context.log.info(
        f"silver {first}..{end}: {result.rows} events in {len(result.dates)} dates, "
        f"{result.duplicates_removed} duplicates removed"
        + ("" if loaded is None else f", {loaded} rows loaded into PostgreSQL")
    )
    single = context.partition_keys[0] if len(context.partition_keys) == 1 else None
    yield dg.MaterializeResult(
        metadata={
            **({"dagster/row_count": result.rows_by_date.get(single, 0)} if single else {}),
            "rows": result.rows,
            "rows_by_date": dg.MetadataValue.json(result.rows_by_date),
            "duplicates_removed": result.duplicates_removed,
            "path": str(lake.silver_events_path(settings)),
            **({} if loaded is None else {"rows_loaded_into_postgres": loaded}),
        }
    )
    yield from per_partition_row_counts(context, context.asset_key, result.rows_by_date)


@dg.asset_check(asset=silver_events, blocking=True, partitions_def=daily_partitions)
def silver_events_valid(
    context: dg.AssetCheckExecutionContext, platform: PlatformConfig
) -> dg.AssetCheckResult:
    """Guards everything downstream, for the run's dates: the columns and types of the silver
    schema, unique event ids, no nulls where the schema forbids them, known event types,
    non-negative prices. Failing dates are named in `bad_dates`."""
    window = context.partition_time_window
    frame = lake.read_silver(platform.settings(), window.start.date(), window.end.date())
    wrong_types = {
        column: f"{frame.schema.get(column)} != {dtype}"
        for column, dtype in lake.SILVER_COLUMNS.items()
        if frame.schema.get(column) != dtype
    }
    if wrong_types:
        return dg.AssetCheckResult(
            passed=False,
            description="silver does not have the schema downstream models read",
            metadata={"wrong_types": dg.MetadataValue.json(wrong_types)},
        )
    required = ["event_id", "event_time", "event_type", "product_id", "user_id", "user_session"]
    problems = frame.group_by("event_date").agg(
        pl.len().alias("rows"),
        (pl.len() - pl.col("event_id").n_unique()).alias("duplicate_event_ids"),
        pl.sum_horizontal(*(pl.col(c).null_count() for c in required)).alias("nulls"),
        (~pl.col("event_type").is_in(EVENT_TYPES)).sum().alias("unknown_event_types"),
        (pl.col("price") < 0).sum().alias("negative_prices"),
    )
    bad = problems.filter(
        (pl.col("duplicate_event_ids") > 0)
        | (pl.col("nulls") > 0)
        | (pl.col("unknown_event_types") > 0)
        | (pl.col("negative_prices") > 0)
    ).sort("event_date")
    totals = problems.drop("event_date").sum()
    return dg.AssetCheckResult(
        passed=bad.is_empty(),
        metadata={
            **{name: int(totals[name][0] or 0) for name in totals.columns},
            "bad_dates": dg.MetadataValue.json(
                {str(row.pop("event_date")): row for row in bad.to_dicts()}
            ),
        },
    )


@dg.asset_check(asset=silver_events, blocking=True, partitions_def=daily_partitions)
def silver_reconciles_with_bronze(
    context: dg.AssetCheckExecutionContext, platform: PlatformConfig
) -> dg.AssetCheckResult:
    """Reconciliation per date: each date's silver rows equal the distinct validated events
    landed in bronze for that date (nothing lost or added between the layers)."""
    settings = platform.settings()
    first, end = (
        context.partition_time_window.start.date(),
        context.partition_time_window.end.date(),
    )
    bronze = lake.read_bronze_window(lake.bronze_path(settings, "events"), first, end)
    expected = dict(
        bronze.group_by(pl.col("event_time").dt.date().cast(pl.String))
        .agg(pl.col("event_id").n_unique())
        .iter_rows()
    )
    silver = lake.read_silver(settings, first, end)
    actual = dict(silver.group_by(pl.col("event_date").cast(pl.String)).len().iter_rows())
    mismatches = {
        day: {"bronze_events": expected.get(day, 0), "silver_rows": actual.get(day, 0)}
        for day in sorted(set(expected) | set(actual))
        if expected.get(day, 0) != actual.get(day, 0)
    }
    return dg.AssetCheckResult(
        passed=not mismatches,
        metadata={
            "bronze_events": sum(expected.values()),
            "silver_rows": sum(actual.values()),
            "mismatched_dates": dg.MetadataValue.json(mismatches),
        },
    )
