"""Schedules that turn the loop: weekly retraining and the daily refresh of the newest partitions
and the online store. Both run by default (`make dev` shows them running); their crons are
`EASYMLOPS_RETRAIN_CRON` and `EASYMLOPS_DAILY_REFRESH_CRON` (UTC).

Why job schedules rather than declarative automation (AutomationCondition): the daily
partitioned assets are built as one run per date range (single-run backfill policy; the DuckDB
warehouse takes one writer). An eager or cron condition is evaluated per asset and partition and
would launch the landing, silver and dbt separately, one partition at a time, where one run over
the range is what this graph needs; a schedule names that range once. Retraining is a decision on
a calendar (or on drift, not built yet), not on an upstream update: the online store and the
training set change every day, a model should not.
"""

from __future__ import annotations

import logging
from datetime import date, datetime, timedelta

import dagster as dg

from easymlops import lake
from easymlops.settings import Settings, get_settings
from easymlops_assets.partitions import daily_partitions, partition_range_tags
from easymlops_assets.resources import PlatformConfig

log = logging.getLogger(__name__)
RANGE_END_TAG = "dagster/asset_partition_range_end"


def retraining_window(
    last_run_end: date | None, bronze: tuple[date, date] | None, today: date, first_partition: date
) -> tuple[date, date]:
    """The daily partitions a retraining run rebuilds: from the last day the previous retraining
    covered (it was still running then, so built again), else every date bronze holds, through
    today (the run lands Kafka first, so today's events are in)."""
    if last_run_end is not None:
        first = last_run_end
    elif bronze is not None:
        first = bronze[0]
    else:
        first = today
    return max(min(first, today), first_partition), today


def _last_range_end(instance: dg.DagsterInstance, schedule_name: str) -> date | None:
    records = instance.get_run_records(
        filters=dg.RunsFilter(
            tags={"dagster/schedule_name": schedule_name},
            statuses=[dg.DagsterRunStatus.SUCCESS],
        ),
        limit=1,
    )
    if not records or RANGE_END_TAG not in records[0].dagster_run.tags:
        return None
    return date.fromisoformat(records[0].dagster_run.tags[RANGE_END_TAG])


def _bronze_range(settings: Settings) -> tuple[date, date] | None:
    try:
        return lake.bronze_date_range(settings)
    except Exception as exc:  # an unreachable lake must not stop the schedule: today still runs
        log.warning("cannot read bronze's dates (%s): the run covers today only", exc)
        return None


def _first_partition() -> date:
    return date.fromisoformat(daily_partitions.get_first_partition_key() or "1970-01-01")


def _today(context: dg.ScheduleEvaluationContext) -> date:
    scheduled: datetime | None = context.scheduled_execution_time
    return (scheduled or datetime.now()).date()


# The cron strings are part of the schedules' definitions (the daemon reads them without running
# code), so they are read when the code location loads, not from a run-time resource: a
# deployment changes them through EASYMLOPS_RETRAIN_CRON / EASYMLOPS_DAILY_REFRESH_CRON and a
# reload of the code location.
@dg.schedule(
    cron_schedule=get_settings().retrain_cron,
    job_name="full_pipeline",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Weekly retraining: land Kafka, rebuild the partitions since the last "
    "retraining, the training set, tune and train, gate, deploy (EASYMLOPS_RETRAIN_CRON).",
)
def retrain_schedule(
    context: dg.ScheduleEvaluationContext, platform: PlatformConfig
) -> dg.RunRequest:
    return retrain_request(context.instance, platform.settings(), _today(context), "retrain")


def retrain_request(
    instance: dg.DagsterInstance, settings: Settings, today: date, key: str
) -> dg.RunRequest:
    """A full_pipeline run over `retraining_window` (the schedule's, and the drift sensor's)."""
    first, last = retraining_window(
        _last_range_end(instance, "retrain_schedule"),
        _bronze_range(settings),
        today,
        _first_partition(),
    )
    return dg.RunRequest(
        run_key=f"{key}:{last.isoformat()}",
        tags=partition_range_tags(first.isoformat(), last.isoformat()),
    )


@dg.schedule(
    cron_schedule=get_settings().daily_refresh_cron,
    job_name="daily_refresh",
    execution_timezone="UTC",
    default_status=dg.DefaultScheduleStatus.RUNNING,
    description="Daily: land Kafka, rebuild yesterday's (now complete) and today's partitions, "
    "refresh the online store (EASYMLOPS_DAILY_REFRESH_CRON).",
)
def daily_refresh_schedule(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
    today = _today(context)
    first = max(today - timedelta(days=1), _first_partition())
    return dg.RunRequest(
        run_key=f"daily:{today.isoformat()}",
        tags=partition_range_tags(first.isoformat(), today.isoformat()),
    )
