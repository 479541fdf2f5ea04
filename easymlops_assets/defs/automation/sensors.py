"""Sensors on MLflow and on run failures, both running by default (each tick is two or three
REST calls to MLflow, or a read of the instance's own event log).

- `mlflow_registry_sensor`: every alias move (a deployment, `easymlops model promote/rollback`,
  the MLflow UI) becomes an observation of `serving_deployment` saying who moved which alias,
  when, from which version to which; a new registered version an observation of
  `purchase_model`. After a champion move not made by a Dagster run it runs `verify_serving`
  (serving follows the champion within its 10 s poll, answers, and matches training). The
  cursor is the last alias-history entry and version seen; run keys are `model@alias:seq`, so a
  move is handled once.
- `drift_retraining_sensor`: a failed (ERROR) `features_not_drifted` check of `feature_drift`
  requests a retraining run (the schedule's window), at most once per
  EASYMLOPS_DRIFT_RETRAIN_MIN_HOURS.
- `alert_on_run_failure`: a failed run (including one stopped by a failed blocking check) is
  logged and posted to EASYMLOPS_ALERT_WEBHOOK_URL, naming the failed steps and checks.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime

import dagster as dg

from easymlops import alerts, registry
from easymlops_assets.resources import PlatformConfig

SERVING = dg.AssetKey("serving_deployment")
MODEL = dg.AssetKey("purchase_model")


def _observation(move: registry.AliasMove, model_name: str) -> dg.AssetObservation:
    return dg.AssetObservation(
        asset_key=SERVING,
        description=move.describe(),
        metadata={
            "model": model_name,
            "alias": move.alias,
            "from_version": move.from_version or "none",
            "to_version": move.to_version,
            "by": move.by,
            "at": move.at,
            "reason": move.reason,
            "history_seq": move.seq,
        },
    )


@dg.sensor(
    job_name="verify_serving",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Records every alias move and new version of the model in MLflow; verifies "
    "serving after a champion move made outside Dagster.",
)
def mlflow_registry_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformConfig
) -> dg.SensorResult:
    from mlflow.exceptions import MlflowException  # imported by registry's calls anyway

    settings = platform.settings()
    try:
        current = registry.aliases(settings)
        history = registry.alias_history(settings)
        versions = registry.all_versions(settings)
    except (MlflowException, OSError) as exc:
        return dg.SensorResult(skip_reason=f"MLflow at {settings.mlflow_uri}: {exc}")
    newest = max((int(v.version) for v in versions), default=0)
    if not context.cursor:
        # First tick: what exists is the starting point, not news (the history is in MLflow).
        cursor = {"seq": history[-1].seq if history else 0, "aliases": current, "version": newest}
        return dg.SensorResult(
            skip_reason=f"watching {settings.model_name}: {current or 'no alias yet'}",
            cursor=json.dumps(cursor),
        )
    cursor = json.loads(context.cursor)
    moves = registry.moves_since(settings, cursor["seq"], cursor["aliases"])
    new_versions = [v for v in versions if int(v.version) > cursor["version"]]
    events: list[dg.AssetObservation] = [_observation(m, settings.model_name) for m in moves]
    for version in new_versions:
        events.append(
            dg.AssetObservation(
                asset_key=MODEL,
                description=f"{settings.model_name} version {version.version} registered",
                metadata={
                    "model_version": str(version.version),
                    "run_id": version.run_id or "",
                    "promotion_gate": (version.tags or {}).get(registry.GATE_TAG, "not gated"),
                },
            )
        )
    run_requests = [
        dg.RunRequest(run_key=f"{settings.model_name}@{m.alias}:{m.seq}")
        for m in moves
        if m.alias == settings.champion_alias and not m.by.startswith("dagster run")
    ]
    known = dict(cursor["aliases"])
    for move in moves:
        known[move.alias] = move.to_version
    new_cursor = {
        "seq": moves[-1].seq if moves else cursor["seq"],
        "aliases": known,
        "version": max(newest, cursor["version"]),
    }
    return dg.SensorResult(
        run_requests=run_requests,
        asset_events=events,
        cursor=json.dumps(new_cursor),
        skip_reason=None if events else "no alias move and no new version",
    )


DRIFT_CHECK_KEY = dg.AssetCheckKey(dg.AssetKey("feature_drift"), "features_not_drifted")


@dg.sensor(
    job_name="full_pipeline",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Requests a retraining when feature_drift's check fails (PSI past the failure "
    "threshold), at most once per EASYMLOPS_DRIFT_RETRAIN_MIN_HOURS.",
)
def drift_retraining_sensor(
    context: dg.SensorEvaluationContext, platform: PlatformConfig
) -> dg.SensorResult:
    from dagster._core.storage.asset_check_execution_record import (
        AssetCheckExecutionRecordStatus,
    )

    from easymlops_assets.defs.automation.schedules import retrain_request

    settings = platform.settings()
    cursor = json.loads(context.cursor) if context.cursor else {"seen": 0, "requested_at": 0.0}
    records = context.instance.event_log_storage.get_asset_check_execution_history(
        DRIFT_CHECK_KEY, limit=50, status={AssetCheckExecutionRecordStatus.FAILED}
    )
    new = [r for r in records if r.id > cursor["seen"]]
    if not new:
        return dg.SensorResult(skip_reason="no failed drift check since the last tick")
    cursor["seen"] = max(r.id for r in new)
    wait = settings.drift_retrain_min_hours * 3600 - (time.time() - cursor["requested_at"])
    if wait > 0:
        return dg.SensorResult(
            skip_reason=f"drift failed again, but the last drift retraining was requested "
            f"{settings.drift_retrain_min_hours - wait / 3600:.1f} h ago (at most one per "
            f"{settings.drift_retrain_min_hours} h)",
            cursor=json.dumps(cursor),
        )
    cursor["requested_at"] = time.time()
    newest = max(new, key=lambda r: r.id)
    request = retrain_request(
        context.instance, settings, datetime.now(UTC).date(), f"drift-{newest.id}"
    )
    return dg.SensorResult(
        run_requests=[
            request.with_replaced_attrs(tags={**request.tags, "easymlops/trigger": "drift"})
        ],
        cursor=json.dumps(cursor),
    )


def _failed_checks(context: dg.RunFailureSensorContext) -> list[str]:
    failed = []
    for record in context.instance.all_logs(
        context.dagster_run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
    ):
        evaluation = record.dagster_event.event_specific_data if record.dagster_event else None
        if isinstance(evaluation, dg.AssetCheckEvaluation) and not evaluation.passed:
            failed.append(
                f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}"
                f" ({evaluation.severity.value})"
            )
    return failed


@dg.run_failure_sensor(
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Logs every failed run and posts it to EASYMLOPS_ALERT_WEBHOOK_URL when set.",
)
def alert_on_run_failure(context: dg.RunFailureSensorContext, platform: PlatformConfig) -> None:
    run = context.dagster_run
    steps = [event.step_key for event in context.get_step_failure_events() if event.step_key]
    alerts.send(
        platform.settings(),
        f"Dagster run {run.run_id} of {run.job_name} failed",
        {
            "run_id": run.run_id,
            "job": run.job_name,
            "failed_steps": ", ".join(steps) or "none",
            "failed_checks": ", ".join(_failed_checks(context)) or "none",
            "message": context.failure_event.message or "",
        },
    )
