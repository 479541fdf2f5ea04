"""The daily partitions (event date, UTC) shared by silver and the partitioned gold models, and
how a run over several of them reports each one."""

from collections.abc import Iterator, Mapping
from datetime import date, timedelta

import dagster as dg

from easymlops.settings import get_settings

# The start date is part of the partitions' definition, read when the code location loads (not a
# run-time resource): EASYMLOPS_PARTITIONS_START and a reload change it.
# Today's partition exists (end_offset=1): events stream in all day, and the late-events
# sensor rebuilds today's partition as they land.
daily_partitions = dg.DailyPartitionsDefinition(
    start_date=get_settings().partitions_start.isoformat(), end_offset=1
)

# A backfill of N dates is one run: silver rewrites N files and dbt gets one window, instead of
# N runs each paying start-up and fighting over the DuckDB write lock.
single_run = dg.BackfillPolicy.single_run()


def partition_range_tags(first: str, last: str) -> dict[str, str]:
    """Run tags that make one run cover the partitions first..last (inclusive keys)."""
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }


def window_dates(context: dg.AssetExecutionContext) -> tuple[date, date]:
    """The run's dates as [first, end): end is the day after the last partition."""
    window = context.partition_time_window
    return window.start.date(), window.end.date()


def inclusive_window(context: dg.AssetExecutionContext) -> tuple[date, date]:
    first, end = window_dates(context)
    return first, end - timedelta(days=1)


def per_partition_row_counts(
    context: dg.AssetExecutionContext, asset_key: dg.AssetKey, counts: Mapping[str, int]
) -> Iterator[dg.AssetMaterialization]:
    """A run over several partitions records one materialization per partition with the
    run's metadata; these follow it so each partition's latest materialization carries its own
    `dagster/row_count` (0 for a date without rows)."""
    if len(context.partition_keys) == 1:
        return
    for key in context.partition_keys:
        yield dg.AssetMaterialization(
            asset_key=asset_key, partition=key, metadata={"dagster/row_count": counts.get(key, 0)}
        )
