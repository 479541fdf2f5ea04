"""After serving: batch scores of each day's carts, their drift against the training reference,
and the live performance of logged predictions once their labels are known."""

from datetime import date, timedelta
from pathlib import Path
from typing import Any

import dagster as dg

from easymlops.settings import Settings
from easymlops_assets.partitions import daily_partitions, single_run, window_dates
from easymlops_assets.resources import Warehouse

DRIFT_CHECK = "features_not_drifted"
LIVE_CHECK = "live_auc_close_to_offline"


def _days(context: dg.AssetExecutionContext) -> list[date]:
    first, end = window_dates(context)
    return [first + timedelta(days=i) for i in range((end - first).days)]


@dg.asset(
    deps=["silver_events", "user_features", "product_features", "serving_deployment"],
    partitions_def=daily_partitions,
    backfill_policy=single_run,
    group_name="monitoring",
    kinds={"xgboost", "polars"},
)
def cart_scores(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    """Every cart event of the day scored by the champion with serving's own feature code
    (serving/batch.py): equal to what /predict answers for that cart with its event_time and
    event_id. Written to the lake (gold/cart_scores/event_date=D) and the warehouse table
    `cart_scores`, with the feature values used; a backfill of N days is one run."""
    from serving.batch import load_champion, score_day, write_scores

    settings = warehouse.settings()
    model = load_champion(settings)
    counts: dict[str, int] = {}
    for day in _days(context):
        scores = score_day(settings, day, model)
        write_scores(settings, day, scores)
        counts[day.isoformat()] = scores.height
        context.log.info(f"{day}: {scores.height} carts scored by version {model.info.version}")
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": sum(counts.values()),
            "rows_by_date": dg.MetadataValue.json(counts),
            "model_version": model.info.version,
        }
    )


def _save_plot(settings: Settings, day: str, figure: Any) -> str:
    import matplotlib.pyplot as plt

    path = settings.home_dir / "plots" / f"feature_drift_{day}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(Path(path).resolve())


@dg.asset(
    deps=["cart_scores"],
    partitions_def=daily_partitions,
    backfill_policy=single_run,
    group_name="monitoring",
    kinds={"numpy", "scipy"},
    check_specs=[dg.AssetCheckSpec(DRIFT_CHECK, asset="feature_drift")],
)
def feature_drift(context: dg.AssetExecutionContext, warehouse: Warehouse) -> dg.MaterializeResult:
    """Each feature's and the score's distribution over the day's carts (cart_scores: what the
    champion was given) against the reference of the version that scored them (its held-out
    rows and its scores of them, saved when it was trained): PSI, and KS for continuous
    features (easymlops/drift.py).
    The check warns at EASYMLOPS_DRIFT_PSI_WARN (0.1) and fails at EASYMLOPS_DRIFT_PSI_FAIL
    (0.25), naming the features; a failure requests retraining (drift_retraining_sensor)."""
    from easymlops import drift
    from easymlops.features import MODEL_FEATURES
    from easymlops.warehouse import reader

    settings = warehouse.settings()
    columns = (*MODEL_FEATURES, "probability")
    by_day: dict[str, list[drift.Drift]] = {}
    versions: dict[str, str] = {}
    with reader(settings) as r:
        for day in _days(context):
            current = r.frame("select * from cart_scores where event_date = ?", [day])
            if current.height == 0:
                continue
            # The reference of the version that scored the day (the newest, if several did).
            version = max(current["model_version"].unique().to_list(), key=int)
            reference = drift.read_reference(settings, version)
            by_day[day.isoformat()] = drift.compare(reference, current, columns)
            versions[day.isoformat()] = version
    warn, fail = settings.drift_psi_warn, settings.drift_psi_fail
    worst: dict[str, float] = {}
    for drifts in by_day.values():
        for d in drifts:
            worst[d.name] = max(worst.get(d.name, 0.0), d.psi)
    failing = sorted((n for n, v in worst.items() if v >= fail), key=lambda n: -worst[n])
    warning = sorted((n for n, v in worst.items() if warn <= v < fail), key=lambda n: -worst[n])
    metadata: dict[str, dg.RawMetadataValue] = {
        "reference_versions": dg.MetadataValue.json(versions),
        "max_psi": dg.MetadataValue.json({n: round(v, 4) for n, v in worst.items()}),
    }
    last_day = max(by_day, default=None)
    if last_day is not None:
        metadata["drift"] = dg.MetadataValue.md(
            f"**{last_day}** against the training reference\n\n"
            + drift.markdown_table(by_day[last_day], warn, fail)
        )
        figure = drift.psi_figure(by_day[last_day], warn, fail)
        metadata["psi_plot"] = dg.MetadataValue.path(_save_plot(settings, last_day, figure))
    if not by_day:
        check = dg.AssetCheckResult(
            check_name=DRIFT_CHECK, passed=True, description="no cart scores for these days"
        )
    elif failing:
        check = dg.AssetCheckResult(
            check_name=DRIFT_CHECK,
            passed=False,
            severity=dg.AssetCheckSeverity.ERROR,
            description=f"drift past PSI {fail}: {', '.join(failing)}",
            metadata={"failing": ", ".join(failing), "warning": ", ".join(warning)},
        )
    else:
        check = dg.AssetCheckResult(
            check_name=DRIFT_CHECK,
            passed=not warning,
            severity=dg.AssetCheckSeverity.WARN,
            description=f"moderate drift: {', '.join(warning)}" if warning else "no drift",
            metadata={"warning": ", ".join(warning)},
        )
    return dg.MaterializeResult(metadata=metadata, check_results=[check])


@dg.asset(
    deps=["bronze_predictions", "training_set"],
    partitions_def=daily_partitions,
    backfill_policy=single_run,
    group_name="monitoring",
    kinds={"polars"},
    check_specs=[dg.AssetCheckSpec(LIVE_CHECK, asset="live_performance")],
)
def live_performance(
    context: dg.AssetExecutionContext, warehouse: Warehouse
) -> dg.MaterializeResult:
    """The day's logged predictions (bronze_predictions, by the day they scored) joined with
    their realized, mature labels: AUC with its interval, logloss, Brier score, PR-AUC and
    calibration per model version (easymlops/live.py). The check warns when a version's live
    AUC is more than EASYMLOPS_LIVE_AUC_MARGIN (0.05) below its offline test AUC."""
    from mlflow.exceptions import MlflowException

    from easymlops import live, registry

    settings = warehouse.settings()
    table: dict[str, dict[str, dict[str, Any]]] = {}
    below: list[str] = []
    for day in _days(context):
        for result in live.performance(settings, day):
            entry: dict[str, Any] = {
                "predictions": result.predictions,
                "labelled": result.labelled,
                **{k.removeprefix("test_"): round(v, 4) for k, v in result.metrics.items()},
            }
            try:
                offline = registry.version_metrics(result.model_version, settings).get("test_auc")
            except MlflowException:  # a version deleted from the registry since
                offline = None
            entry["offline_auc"] = None if offline is None else round(offline, 4)
            live_auc = result.metrics.get("test_auc")
            if (
                live_auc is not None
                and offline is not None
                and live_auc < offline - settings.live_auc_margin
            ):
                below.append(f"v{result.model_version} on {day}: {live_auc:.3f} < {offline:.3f}")
            table.setdefault(day.isoformat(), {})[result.model_version] = entry
    rows = sum(e["labelled"] for d in table.values() for e in d.values())
    check = dg.AssetCheckResult(
        check_name=LIVE_CHECK,
        passed=not below,
        severity=dg.AssetCheckSeverity.WARN,
        description=(
            "live AUC below offline - margin: " + "; ".join(below)
            if below
            else f"{rows} labelled predictions, none below the margin"
            if rows
            else "no labelled predictions for these days"
        ),
    )
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": rows,
            "by_day_and_version": dg.MetadataValue.json(table),
        },
        check_results=[check],
    )
