"""Model training and the promotion gate: `purchase_model` tunes XGBoost with Ray Tune, refits
the best configuration and registers it as a new version; it only becomes `champion` (in
`serving_deployment`) if the blocking `promotion_gate` passes. The heavy libraries (ray,
xgboost, mlflow) load inside the asset functions, when a run needs them."""

import subprocess
from pathlib import Path

import dagster as dg
import polars as pl

from easymlops.features import MODEL_FEATURES
from easymlops.settings import Settings
from easymlops_assets.resources import Warehouse

# Below this share of the oracle AUC a model leaves a lot of the learnable behaviour unlearnt.
MIN_ORACLE_RATIO = 0.95


def _git_commit() -> str:
    """The commit of the code that trains (the repository this file is in), or "unknown"."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except OSError:
        return "unknown"
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def _lineage(
    context: dg.AssetExecutionContext, settings: Settings, data_fingerprint: str, dates: list[str]
) -> dict:
    """Tags that lead from a model version back to its exact data and code."""
    from deltalake import DeltaTable

    from easymlops import lake

    bronze = lake.bronze_path(settings, "events")
    delta_version = DeltaTable(bronze).version() if DeltaTable.is_deltatable(bronze) else -1
    training_set = context.instance.get_latest_materialization_event(dg.AssetKey("training_set"))
    invocation = "unknown"
    if training_set is not None and training_set.asset_materialization is not None:
        entry = training_set.asset_materialization.metadata.get("invocation_id")
        invocation = str(entry.value) if entry is not None else "unknown"
    return {
        "dagster_run_id": context.run_id,
        "easymlops.bronze_events_delta_version": str(delta_version),
        "easymlops.training_dates": f"{dates[0]}..{dates[-1]}" if dates else "",
        "easymlops.training_set_dbt_invocation_id": invocation,
        "easymlops.training_rows_sha256": data_fingerprint,
        "easymlops.git_commit": _git_commit(),
    }


@dg.asset(deps=["training_set"], group_name="training", kinds={"xgboost", "mlflow", "ray"})
def purchase_model(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    """XGBoost purchase-propensity model: a Ray Tune search (ASHA) on the training days scored
    on the validation days, the best configuration refitted on both and scored once on the
    held-out test days; logged to MLflow (each trial a nested run) and registered as a new
    version of the registered model."""
    from easymlops import registry, training, tuning

    settings = warehouse.settings()
    data = training.load_training_data(settings)
    context.log.info(
        f"tuning on {data.train.height} rows ({settings.tune_trials} trials, "
        f"{settings.tune_concurrency} at a time), testing on {data.test.height}"
    )
    model = training.train_tuned(data, settings, progress=context.log.info)
    for note in model.notes:
        context.log.warning(note)
    search = model.search
    dates = data.dates(data.train) + data.dates(data.test)
    registered = registry.log_and_register(
        model.booster,
        params={
            **model.params,
            "num_boost_round": model.rounds,
            "early_stopping_rounds": training.EARLY_STOPPING_ROUNDS,
            "max_rounds": training.MAX_ROUNDS,
            "tune_trials": settings.tune_trials,
            "tune_concurrency": settings.tune_concurrency,
            "tune_time_budget_seconds": settings.tune_time_budget_seconds,
            "validation_days": settings.validation_days,
            "holdout_days": settings.holdout_days,
        },
        metrics=model.metrics,
        settings=settings,
        tags={
            **_lineage(context, settings, data.fingerprint(), dates),
            "test_period_start": data.test_start,
        },
        artifacts={
            "tuning/search_space.json": search.search_space,
            "tuning/best_config.json": {**search.best_config, "num_boost_round": model.rounds},
            "evaluation/calibration.json": model.calibration,
            "evaluation/feature_importance.json": model.importance,
        },
        figures={"evaluation/calibration.png": training.calibration_figure(model.calibration)},
    )
    experiment_id = registry.client(settings).get_run(registered.run_id).info.experiment_id
    tuning.log_trials(
        search,
        tracking_uri=settings.mlflow_uri,
        experiment_id=experiment_id,
        parent_run_id=registered.run_id,
    )
    from easymlops import drift

    reference = data.test.select(MODEL_FEATURES).with_columns(
        pl.Series("probability", training.predict(model.booster, data.test))
    )
    drift.write_reference(settings, registered.version, reference)
    metrics = model.metrics
    context.log.info(
        f"registered {registered.name} version {registered.version}: test AUC "
        f"{metrics['test_auc']:.4f}, oracle {metrics.get('oracle_test_auc', float('nan')):.4f}"
    )
    return dg.MaterializeResult(
        metadata={
            "model_name": registered.name,
            "model_version": registered.version,
            "run_id": registered.run_id,
            "model_uri": registered.model_uri,
            "dagster/row_count": data.train.height + data.test.height,
            "best_config": dg.MetadataValue.json(search.best_config),
            **{k: float(v) for k, v in metrics.items()},
        }
    )


def latest_model_version(instance: dg.DagsterInstance) -> str:
    event = instance.get_latest_materialization_event(dg.AssetKey("purchase_model"))
    if event is None or event.asset_materialization is None:
        raise RuntimeError("purchase_model has never been materialized")
    return str(event.asset_materialization.metadata["model_version"].value)


@dg.asset_check(asset=purchase_model)
def model_close_to_oracle(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    """How much of the generator's learnable behaviour the model learnt: its held-out AUC over
    the oracle's (the true purchase probabilities on the same rows). Warns below 0.95.
    Replayed real data has no truth: then "not applicable", and the check passes."""
    event = context.instance.get_latest_materialization_event(dg.AssetKey("purchase_model"))
    metadata = event.asset_materialization.metadata if event and event.asset_materialization else {}
    ratio = metadata.get("model_oracle_ratio")
    if ratio is None:
        return dg.AssetCheckResult(
            passed=True,
            description="not applicable: no ground truth for the held-out rows (real data)",
            metadata={"applicable": False},
        )
    value = float(ratio.value)  # type: ignore[arg-type]
    return dg.AssetCheckResult(
        passed=value >= MIN_ORACLE_RATIO,
        severity=dg.AssetCheckSeverity.WARN,
        description=f"model/oracle AUC {value:.3f} (warns below {MIN_ORACLE_RATIO})",
        metadata={
            "applicable": True,
            "model_oracle_ratio": value,
            "test_auc": float(metadata["test_auc"].value),  # type: ignore[arg-type]
            "oracle_test_auc": float(metadata["oracle_test_auc"].value),  # type: ignore[arg-type]
        },
    )


@dg.asset_check(asset=purchase_model, blocking=True)
def promotion_gate(
    context: dg.AssetCheckExecutionContext, warehouse: Warehouse
) -> dg.AssetCheckResult:
    """Blocks promotion unless the new version, scored on the same held-out rows as the
    price-only baseline and the current champion, measurably beats the baseline, is not
    measurably worse than the champion (paired bootstrap intervals), and is not implausibly
    good (above the oracle AUC plus a margin, or the configured ceiling on real data)."""
    from easymlops import promotion, registry

    settings = warehouse.settings()
    version = latest_model_version(context.instance)
    evaluation = promotion.evaluate(settings, version)
    decision = evaluation.decision
    details = evaluation.details()
    registry.record_gate(version, decision.passed, decision.description, settings, details)
    context.log.info(f"promotion gate for version {version}: {decision.description}")
    return dg.AssetCheckResult(
        passed=decision.passed,
        description=decision.description,
        metadata={k: v if isinstance(v, int | float) else str(v) for k, v in details.items()},
    )
