"""Run the Dagster asset graph in-process against the persistent instance the UI reads, so a
demo or test run shows up in `make dev` exactly like a run launched from the UI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import date, timedelta
from typing import Any

from easymlops.settings import Settings

GATE_CHECK = "purchase_model:promotion_gate"


def dagster_home(settings: Settings) -> str:
    """The local Dagster instance directory, with a dagster.yaml: telemetry off (this machine
    may have no route to the internet); run monitoring on, because steps run inside the run's
    process (settings.dagster_executor), so a run whose process dies (killed, out of memory)
    is marked failed by the daemon of `dagster dev` instead of staying STARTED."""
    home = settings.home_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text(
            "telemetry:\n  enabled: false\n"
            "run_monitoring:\n  enabled: true\n  poll_interval_seconds: 30\n"
        )
    return str(home)


@dataclass
class PipelineResult:
    success: bool
    run_id: str
    materializations: dict[str, dict[str, Any]] = field(default_factory=dict)
    checks: dict[str, bool] = field(default_factory=dict)
    # asset:check -> (description, metadata) of its evaluation
    check_details: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict)
    # checks of severity WARN (a failed one warns; it stops nothing)
    warn_checks: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    failed_steps: list[str] = field(default_factory=list)
    # Daily partitioned assets: partition -> metadata of its latest materialization in the run.
    partitions: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)

    def rows(self, asset: str) -> int | None:
        """dagster/row_count of an asset: summed over its partitions when partitioned."""
        if asset in self.partitions:
            return sum(int(m.get("dagster/row_count", 0)) for m in self.partitions[asset].values())
        count = self.materializations.get(asset, {}).get("dagster/row_count")
        return None if count is None else int(count)

    first_date: str = ""
    last_date: str = ""

    @property
    def gate_refused(self) -> bool:
        """The run failed only because the promotion gate refused the new model version: a
        normal outcome of a platform with a gate (the champion keeps serving), not a failure."""
        return (
            not self.success
            and self.checks.get(GATE_CHECK) is False
            and bool(self.failed_steps)
            and all("promotion_gate" in step for step in self.failed_steps)
        )


class NotEnoughData(RuntimeError):
    """The data cannot train a model yet; the message says what is missing, in one line."""


def _champion_trained_until(settings: Settings) -> tuple[str, date] | None:
    """The champion's version and the last date it was trained and tested on, or None (no
    champion, MLflow unreachable, or a version without a drift reference to compare with)."""
    from easymlops import drift, registry

    try:
        champion = registry.champion(settings)
        if champion is None:
            return None
        tags = registry.client(settings).get_model_version(settings.model_name, champion.version)
        dates = (tags.tags or {}).get("easymlops.training_dates", "")
        drift.read_reference(settings, champion.version)
    except Exception:  # monitoring before retraining is a bonus, never a reason to fail
        return None
    if ".." not in dates:
        return None
    return champion.version, date.fromisoformat(dates.split("..")[1])


def run_pipeline(
    settings: Settings,
    job_name: str = "full_pipeline",
    *,
    first: date | None = None,
    last: date | None = None,
) -> PipelineResult:
    """Materialize the asset graph of the code location (the same Definitions `dagster dev`
    loads), in runs against the persistent instance:

    1. `land_kafka`: land what Kafka holds;
    2. when a champion exists and bronze holds dates after its training data: `lakehouse_refresh`
       over the dates, then `monitoring` over the new dates only (the champion's scores, drift
       against its reference, live performance), so data that changed is seen before a model
       retrains on it;
    3. the rest of `job_name` (retraining, gate, deployment) over the dates.

    The dates are those bronze holds, within [first, last] when given. The result merges the
    runs."""
    os.environ.setdefault("DAGSTER_HOME", dagster_home(settings))
    from easymlops.warehouse import prepare_manifest

    prepare_manifest()
    import dagster as dg

    from easymlops import lake
    from easymlops_assets.definitions import defs as load_defs
    from easymlops_assets.partitions import daily_partitions, partition_range_tags

    definitions = load_defs()
    # INFO on the console shows each step as it starts and ends; the full DEBUG event log is
    # stored in the instance and visible in the UI.
    run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
    runs: list[Any] = []
    with dg.DagsterInstance.get() as instance:
        landing = definitions.resolve_job_def("land_kafka").execute_in_process(
            instance=instance, raise_on_error=False, run_config=run_config
        )
        runs.append(landing)
        if not landing.success:
            return _merge(runs)
        dates = lake.bronze_date_range(settings)
        if dates is None:
            raise NotEnoughData("bronze holds no event: produce and validate events first")
        start = max(dates[0].isoformat(), (first or dates[0]).isoformat())
        end = min(dates[1].isoformat(), (last or dates[1]).isoformat())
        start = max(start, daily_partitions.get_first_partition_key() or "")
        end = min(end, daily_partitions.get_last_partition_key() or "")
        if start > end:
            raise NotEnoughData(
                f"bronze events span {dates[0]}..{dates[1]}: nothing in the daily partitions "
                f"{first or daily_partitions.get_first_partition_key()}..{last or 'today'} "
                "(set EASYMLOPS_PARTITIONS_START earlier, or --from/--to within the data)"
            )
        job = definitions.resolve_job_def(job_name)
        selection = set(job.asset_layer.executable_asset_keys)
        # Landing just ran: landing again would only record a second, empty landing.
        selection -= {dg.AssetKey("bronze_events"), dg.AssetKey("bronze_invalid_events")}
        trained = _champion_trained_until(settings)
        new_start = max(start, (trained[1] + timedelta(days=1)).isoformat()) if trained else None
        if new_start is not None and new_start <= end:
            refresh = definitions.resolve_job_def("lakehouse_refresh")
            refreshed = refresh.execute_in_process(
                instance=instance,
                raise_on_error=False,
                run_config=run_config,
                tags=partition_range_tags(start, end),
            )
            runs.append(refreshed)
            if not refreshed.success:
                return _merge(runs, start, end)
            runs.append(
                definitions.resolve_job_def("monitoring").execute_in_process(
                    instance=instance,
                    raise_on_error=False,
                    run_config=run_config,
                    tags=partition_range_tags(new_start, end),
                )
            )
            selection -= set(refresh.asset_layer.executable_asset_keys)
        runs.append(
            job.execute_in_process(
                instance=instance,
                raise_on_error=False,
                run_config=run_config,
                tags=partition_range_tags(start, end),
                asset_selection=sorted(selection),
            )
        )
    return _merge(runs, start, end)


def _merge(runs: list[Any], first: str = "", last: str = "") -> PipelineResult:
    """One result for several runs: the last run's id and outcome, everyone's events."""
    results = [_summarize(run) for run in runs]
    merged = results[-1]
    for earlier in results[:-1]:
        merged.success = merged.success and earlier.success
        merged.materializations = {**earlier.materializations, **merged.materializations}
        for asset, partitions in earlier.partitions.items():
            merged.partitions[asset] = {**partitions, **merged.partitions.get(asset, {})}
        merged.checks = {**earlier.checks, **merged.checks}
        merged.check_details = {**earlier.check_details, **merged.check_details}
        merged.warn_checks |= earlier.warn_checks
        merged.failures = earlier.failures + merged.failures
        merged.failed_steps = earlier.failed_steps + merged.failed_steps
    merged.first_date, merged.last_date = first, last
    return merged


def _summarize(run: Any) -> PipelineResult:
    result = PipelineResult(success=run.success, run_id=run.run_id)
    for event in run.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            materialization = event.step_materialization_data.materialization
            name = materialization.asset_key.to_user_string()
            metadata = {k: v.value for k, v in materialization.metadata.items()}
            if materialization.partition is None:
                result.materializations[name] = metadata
            else:
                result.partitions.setdefault(name, {})[materialization.partition] = metadata
                result.materializations[name] = metadata
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            key = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
            result.checks[key] = bool(evaluation.passed)
            if evaluation.severity.value == "WARN":
                result.warn_checks.add(key)
            result.check_details[key] = (
                evaluation.description or "",
                {k: v.value for k, v in evaluation.metadata.items()},
            )
        elif event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error
            result.failures.append(
                f"{event.step_key}: {error.message.strip() if error else 'failed'}"
            )
            result.failed_steps.append(str(event.step_key))
    return result
