"""Run the Dagster asset graph in-process against the persistent instance the UI reads, so a
demo or test run shows up in `make dev` exactly like a run launched from the UI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from easymlops.settings import Settings

GATE_CHECK = "purchase_model:promotion_gate"


def dagster_home(settings: Settings) -> str:
    """The local Dagster instance directory, with a dagster.yaml (telemetry off: this machine
    may have no route to the internet)."""
    home = settings.home_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    config = home / "dagster.yaml"
    if not config.exists():
        config.write_text("telemetry:\n  enabled: false\n")
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


def run_pipeline(settings: Settings, job_name: str = "full_pipeline") -> PipelineResult:
    """Materialize every asset of the code location (the same Definitions `dagster dev` loads):
    first the Kafka landing (job `land_kafka`), then the rest of `job_name` over the daily
    partitions of every event date bronze holds, as one run. The result merges both runs."""
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
    with dg.DagsterInstance.get() as instance:
        landing = definitions.resolve_job_def("land_kafka").execute_in_process(
            instance=instance, raise_on_error=False, run_config=run_config
        )
        if not landing.success:
            return _summarize(landing)
        dates = lake.bronze_date_range(settings)
        if dates is None:
            raise RuntimeError("bronze holds no event: produce and validate events first")
        first = max(dates[0].isoformat(), daily_partitions.get_first_partition_key() or "")
        last = min(dates[1].isoformat(), daily_partitions.get_last_partition_key() or "")
        if first > last:
            raise RuntimeError(
                f"bronze events span {dates[0]}..{dates[1]}, outside the daily partitions "
                f"({daily_partitions.get_first_partition_key()} to today): set "
                "EASYMLOPS_PARTITIONS_START earlier"
            )
        job = definitions.resolve_job_def(job_name)
        landed = {dg.AssetKey("bronze_events"), dg.AssetKey("bronze_invalid_events")}
        run = job.execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config=run_config,
            tags=partition_range_tags(first, last),
            # Landing just ran: landing again here would only record a second, empty landing.
            asset_selection=sorted(set(job.asset_layer.executable_asset_keys) - landed),
        )
    result = _summarize(run)
    landing_result = _summarize(landing)
    result.materializations = {**landing_result.materializations, **result.materializations}
    result.checks = {**landing_result.checks, **result.checks}
    result.check_details = {**landing_result.check_details, **result.check_details}
    result.warn_checks |= landing_result.warn_checks
    result.first_date, result.last_date = first, last
    return result


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
