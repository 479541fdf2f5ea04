"""Run the Dagster asset graph in-process against the persistent instance the UI reads, so a
demo or test run shows up in `make dev` exactly like a run launched from the UI."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from easymlops.settings import Settings


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
    failures: list[str] = field(default_factory=list)


def run_pipeline(settings: Settings, job_name: str = "full_pipeline") -> PipelineResult:
    """Materialize every asset of the code location (the same Definitions `dagster dev` loads)."""
    os.environ.setdefault("DAGSTER_HOME", dagster_home(settings))
    from easymlops.warehouse import prepare_manifest

    prepare_manifest()
    import dagster as dg

    from easymlops_assets.definitions import defs as load_defs

    definitions = load_defs()
    job = definitions.resolve_job_def(job_name)
    with dg.DagsterInstance.get() as instance:
        # INFO on the console shows each step as it starts and ends; the full DEBUG event log
        # is stored in the instance and visible in the UI.
        run = job.execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
    result = PipelineResult(success=run.success, run_id=run.run_id)
    for event in run.all_events:
        if event.event_type_value == "ASSET_MATERIALIZATION":
            materialization = event.step_materialization_data.materialization  # type: ignore[union-attr]
            result.materializations[materialization.asset_key.to_user_string()] = {
                k: v.value for k, v in materialization.metadata.items()
            }
        elif event.event_type_value == "ASSET_CHECK_EVALUATION":
            evaluation = event.event_specific_data
            key = f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"  # type: ignore[union-attr]
            result.checks[key] = bool(evaluation.passed)  # type: ignore[union-attr]
        elif event.event_type_value == "STEP_FAILURE":
            error = event.event_specific_data.error  # type: ignore[union-attr]
            result.failures.append(
                f"{event.step_key}: {error.message.strip() if error else 'failed'}"
            )
    return result
