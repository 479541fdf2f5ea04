"""Kafka sensors: request a bronze landing run for each new range of offsets of a topic.

A sensor reads only the topic's id and end offsets (never a message), so a tick is cheap. Its
cursor is the end of the last range it requested; the run key names the range, so Dagster
never launches the same range twice, and the run itself commits its offsets atomically with the
data (see `lake.land_topic`), so a re-run or a crash mid-run neither loses nor duplicates.

The event sensors are stopped by default: `easymlops demo` and `full_pipeline` land bronze
themselves, and a second landing of the same table at the same time is refused (Delta's
concurrent-transaction check), a failed run. Turn them on in the UI (Automation) for continuous
landing. The predictions sensor runs by default: only it lands predictions.
"""

import json
from collections.abc import Callable
from datetime import date, timedelta

import dagster as dg

from easymlops.kafka import KafkaUnavailable, end_offsets, topic_id
from easymlops.settings import Settings
from easymlops_assets.defs.lakehouse.assets import (
    bronze_events,
    bronze_invalid_events,
    bronze_predictions,
)
from easymlops_assets.partitions import daily_partitions, partition_range_tags
from easymlops_assets.resources import PlatformConfig


def offset_range(offsets: dict[int, int]) -> str:
    return ",".join(f"{p}={o}" for p, o in sorted(offsets.items()))


def run_key(topic: str, incarnation: str, start: dict[int, int], end: dict[int, int]) -> str:
    return f"{topic}@{incarnation}:{offset_range(start)}-{offset_range(end)}"


def landing_request(
    context: dg.SensorEvaluationContext, settings: Settings, topic: str, asset: dg.AssetsDefinition
) -> dg.SensorResult | dg.SkipReason:
    try:
        incarnation = topic_id(settings, topic)
        ends = end_offsets(settings, topic)
    except KafkaUnavailable as exc:
        return dg.SkipReason(str(exc))
    cursor = json.loads(context.cursor) if context.cursor else None
    if cursor is None or cursor["topic_id"] != incarnation:
        # First tick, or a recreated topic (offsets from 0 again): the range starts at 0; the
        # run starts at what the table's log recorded anyway, so nothing lands twice.
        start = dict.fromkeys(ends, 0)
    else:
        start = {int(p): o for p, o in cursor["offsets"].items()}
    if not any(end > start.get(p, 0) for p, end in ends.items()):
        return dg.SkipReason(f"{topic}: no new offsets past {offset_range(start)}")
    start = {p: start.get(p, 0) for p in ends}
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=run_key(topic, incarnation, start, ends),
                run_config={
                    "ops": {
                        asset.op.name: {
                            "config": {"until_offsets": {str(p): o for p, o in ends.items()}}
                        }
                    }
                },
                asset_selection=[asset.key],
            )
        ],
        cursor=json.dumps(
            {"topic_id": incarnation, "offsets": {str(p): o for p, o in ends.items()}}
        ),
    )


def landing_sensor(
    asset: dg.AssetsDefinition,
    topic_of: Callable[[Settings], str],
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
) -> dg.SensorDefinition:
    name = f"{asset.key.to_user_string()}_sensor"

    @dg.sensor(
        name=name,
        asset_selection=[asset],
        minimum_interval_seconds=30,
        default_status=default_status,
        description=f"Requests a landing run of {asset.key.to_user_string()} for each new range "
        "of offsets of its Kafka topic (reads end offsets only).",
    )
    def _sensor(
        context: dg.SensorEvaluationContext, platform: PlatformConfig
    ) -> dg.SensorResult | dg.SkipReason:
        settings = platform.settings()
        return landing_request(context, settings, topic_of(settings), asset)

    return _sensor


bronze_events_sensor = landing_sensor(bronze_events, lambda s: s.topic_validated)
bronze_invalid_events_sensor = landing_sensor(bronze_invalid_events, lambda s: s.topic_invalid)
# Running by default: no job other than this sensor's runs lands predictions (full_pipeline
# leaves bronze_predictions out), so no two landings of the table meet.
bronze_predictions_sensor = landing_sensor(
    bronze_predictions, lambda s: s.topic_predictions, dg.DefaultSensorStatus.RUNNING
)


def refresh_window(dates: list[str], first: str, last: str) -> tuple[str, str] | None:
    """The partitions to rebuild after events of `dates` landed: those dates and one day on
    each side (a cart's label can come from the next day's purchase, a session's features from
    the previous day's events), clipped to the partitions [first, last]."""
    days = sorted(date.fromisoformat(d) for d in dates)
    if not days:
        return None
    start = max((days[0] - timedelta(days=1)).isoformat(), first)
    end = min((days[-1] + timedelta(days=1)).isoformat(), last)
    return (start, end) if start <= end else None


@dg.sensor(
    job_name="lakehouse_refresh",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.STOPPED,
    description="After landings of bronze_events, rebuilds the silver and gold partitions of the "
    "event dates they landed (late events included), as one single-run backfill per tick.",
)
def late_events_sensor(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    # Every landing since the cursor (storage id), oldest first: dagster's asset_sensor would
    # only see the latest one when two landed between ticks, and miss the other's dates.
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=bronze_events.key,
            after_storage_id=int(context.cursor) if context.cursor else None,
        ),
        limit=100,
        ascending=True,
    ).records
    if not records:
        return dg.SensorResult(skip_reason="no landing of bronze_events since the last tick")
    dates: set[str] = set()
    for record in records:
        landed = record.asset_materialization.metadata.get("rows_by_date")  # type: ignore[union-attr]
        if isinstance(landed, dg.JsonMetadataValue) and isinstance(landed.value, dict):
            dates.update(landed.value)
    cursor = str(records[-1].storage_id)
    window = refresh_window(
        sorted(dates),
        daily_partitions.get_first_partition_key() or "",
        daily_partitions.get_last_partition_key() or "",
    )
    if window is None:
        return dg.SensorResult(
            skip_reason=f"{len(records)} landing(s) added no event in a partition", cursor=cursor
        )
    return dg.SensorResult(
        run_requests=[
            dg.RunRequest(
                run_key=f"late-events:{records[0].storage_id}-{records[-1].storage_id}",
                tags=partition_range_tags(*window),
            )
        ],
        cursor=cursor,
    )
