"""Lake layers: bronze lands Kafka topics exactly once; silver types, deduplicates, sessionizes."""

import dagster as dg
import polars as pl

from easymlops import lake
from easymlops.schema import EVENT_TYPES
from easymlops.settings import get_settings


class LandingConfig(dg.Config):
    """The range a landing run covers. The sensors set `until_offsets` (partition -> end offset
    to stop at, from the run key's range); without it a run lands everything up to the current
    end offsets. The start is always what the bronze table's Delta log recorded."""

    until_offsets: dict[str, int] | None = None


def _land(
    context: dg.AssetExecutionContext, config: LandingConfig, topic: str, table: str, kind: str
) -> dg.MaterializeResult:
    settings = get_settings()
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
        }
    )


@dg.asset(deps=["events_validated"], group_name="lakehouse", kinds={"delta", "polars"})
def bronze_events(context: dg.AssetExecutionContext, config: LandingConfig) -> dg.MaterializeResult:
    """Validated events landed from Kafka into a Delta table, with their partition and offset.
    Re-running lands only offsets not yet landed (row_count is what this run added)."""
    settings = get_settings()
    return _land(context, config, settings.topic_validated, "events", "validated")


@dg.asset(deps=["events_invalid"], group_name="lakehouse", kinds={"delta", "polars"})
def bronze_invalid_events(
    context: dg.AssetExecutionContext, config: LandingConfig
) -> dg.MaterializeResult:
    """Dead-letter envelopes landed from Kafka, kept for inspection and replay."""
    settings = get_settings()
    return _land(context, config, settings.topic_invalid, "invalid_events", "invalid")


@dg.asset_check(asset=bronze_events, blocking=True)
def bronze_events_offsets_unique() -> dg.AssetCheckResult:
    """Exactly-once landing: no Kafka record (topic incarnation, partition, offset) appears
    twice in bronze."""
    frame = lake.read_bronze(lake.bronze_path(get_settings(), "events"))
    record = ("kafka_topic_id", "kafka_partition", "kafka_offset")
    duplicates = frame.height - frame.select(record).n_unique()
    return dg.AssetCheckResult(
        passed=duplicates == 0, metadata={"rows": frame.height, "duplicate_offsets": duplicates}
    )


@dg.asset_check(asset=bronze_invalid_events, additional_deps=[bronze_events])
def invalid_ratio_below_threshold() -> dg.AssetCheckResult:
    """Warns when more than 10% of all events landed were rejected: a producer is broken."""
    settings = get_settings()
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


@dg.asset(deps=[bronze_events], group_name="lakehouse", kinds={"parquet", "polars"})
def silver_events() -> dg.MaterializeResult:
    """Typed, deduplicated (by event_id), sessionized events, one Parquet file per event date."""
    settings = get_settings()
    result = lake.build_silver(settings)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.rows,
            "duplicates_removed": result.duplicates_removed,
            "dates": dg.MetadataValue.json(result.dates),
            "path": str(lake.silver_events_path(settings)),
        }
    )


@dg.asset_check(asset=silver_events, blocking=True)
def silver_events_valid() -> dg.AssetCheckResult:
    """Guards everything downstream: unique event ids, no nulls where the schema forbids them,
    known event types, non-negative prices."""
    frame = lake.read_silver(get_settings())
    required = ["event_id", "event_time", "event_type", "product_id", "user_id", "user_session"]
    nulls = {c: int(frame[c].null_count()) for c in required if frame[c].null_count()}
    duplicate_ids = frame.height - frame["event_id"].n_unique()
    unknown_types = frame.filter(~pl.col("event_type").is_in(EVENT_TYPES)).height
    negative_prices = frame.filter(pl.col("price") < 0).height
    return dg.AssetCheckResult(
        passed=frame.height > 0
        and not nulls
        and duplicate_ids == 0
        and unknown_types == 0
        and negative_prices == 0,
        metadata={
            "rows": frame.height,
            "null_counts": dg.MetadataValue.json(nulls),
            "duplicate_event_ids": duplicate_ids,
            "unknown_event_types": unknown_types,
            "negative_prices": negative_prices,
        },
    )
