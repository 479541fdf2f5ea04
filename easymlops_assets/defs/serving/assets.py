"""Real-time inference: the gated model becomes `challenger`, then `champion`, and Ray Serve
serves the champion."""

import dagster as dg
import httpx

from easymlops import promotion, registry
from easymlops.settings import Settings
from easymlops_assets.defs.training.assets import latest_model_version
from easymlops_assets.resources import PlatformConfig, Warehouse


@dg.asset(deps=["purchase_model", "online_features"], group_name="serving", kinds={"ray"})
def serving_deployment(
    context: dg.AssetExecutionContext, warehouse: Warehouse
) -> dg.MaterializeResult:
    """Makes the latest version the `challenger` if it passed the promotion gate, then the
    `champion` unless a rollback holds the champion or promotion is manual
    (easymlops.promotion.deploy_gated), and makes sure the Ray Serve app runs on the local Ray
    head; a running app hot-reloads a new champion. A version that failed the gate, or was never
    gated, is refused."""
    from serving.deploy import deploy  # ray is heavy: imported only when this asset runs

    settings = warehouse.settings()
    version = latest_model_version(context.instance)
    # The blocking gate stops this asset in the run that trained the model; this also covers a
    # deployment materialized on its own later, after a gate that failed or never ran.
    try:
        outcome = promotion.deploy_gated(version, settings, by=f"dagster run {context.run_id}")
    except promotion.NotGated as exc:
        raise dg.Failure(
            f"{exc} (materialize purchase_model with its promotion_gate check first)"
        ) from exc
    context.log.info(f"challenger {outcome.version}, champion {outcome.champion}: {outcome.reason}")
    url = deploy(settings, wait_ready=True)
    served = wait_for_version(settings, outcome.champion)
    context.log.info(f"serving {served} at {url}")
    return dg.MaterializeResult(
        metadata={
            "url": dg.MetadataValue.url(url),
            "model_version": outcome.champion,
            "challenger": outcome.version,
            "champion_moved": outcome.promoted,
            "decision": outcome.reason,
            "served": served,
        }
    )


def wait_for_version(settings: Settings, version: str, timeout: float = 60.0) -> str:
    """Wait until serving answers with `version` (it polls the alias every 10 s)."""
    import time

    deadline = time.monotonic() + timeout
    served = ""
    while time.monotonic() < deadline:
        response = httpx.get(
            f"{settings.serve_url}/model", timeout=5, headers=settings.serve_headers
        )
        if response.status_code == 200:
            served = str(response.json().get("version"))
            if served == version:
                return served
        time.sleep(1)
    raise RuntimeError(
        f"Ray Serve still serves version {served or 'none'} after {timeout}s, not {version}"
    )


@dg.op
def promote_challenger_op(context: dg.OpExecutionContext, platform: PlatformConfig) -> str:
    """Make the `challenger` the `champion` (it passed the gate to become challenger)."""
    settings = platform.settings()
    version = registry.aliases(settings).get(settings.challenger_alias)
    if version is None:
        raise dg.Failure(f"{settings.model_name} has no {settings.challenger_alias} to promote")
    promotion.require_gate_passed(version, settings)
    registry.promote(
        version, settings, by=f"dagster run {context.run_id}", reason="promote_challenger job"
    )
    context.log.info(f"{settings.model_name}: champion -> version {version}")
    return version


@dg.job(description="Make the challenger (a version that passed the gate) the champion.")
def promote_challenger() -> None:
    promote_challenger_op()


@dg.asset_check(asset=serving_deployment)
def serving_answers(platform: PlatformConfig) -> dg.AssetCheckResult:
    """The deployment is ready and returns a probability for a sample request."""
    settings = platform.settings()
    ready = httpx.get(f"{settings.serve_url}/readyz", timeout=10, headers=settings.serve_headers)
    response = httpx.post(
        f"{settings.serve_url}/predict",
        json={"user_id": 1, "product_id": 1, "user_session": "check", "price": 10.0},
        timeout=10,
        headers=settings.serve_headers,
    )
    body = response.json() if response.status_code == 200 else {}
    probability = body.get("probability", -1.0)
    return dg.AssetCheckResult(
        passed=ready.status_code == 200 and 0.0 <= probability <= 1.0,
        metadata={
            "readyz": ready.status_code,
            "predict_status": response.status_code,
            "probability": probability,
        },
    )


@dg.asset_check(asset=serving_deployment)
def served_predictions_match_training(warehouse: Warehouse) -> dg.AssetCheckResult:
    """Online/offline parity through HTTP: carts of the online store's as-of day, posted to
    /predict with their event_time and event_id, get the training row's features (when serving
    reports them: EASYMLOPS_SERVE_DEBUG_FEATURES) and the registered model's offline prediction
    of that row within 1e-6 (easymlops.parity). With the store as of today, there are no carts
    of that day yet: not applicable (materialize online_features with as_of set to a held-out
    day to compare)."""
    from easymlops import online_store, parity

    settings = warehouse.settings()
    day = online_store.materialized_as_of(settings)
    if day is None:
        return dg.AssetCheckResult(passed=False, description="feat:meta has no as_of in Redis")
    report = parity.compare(settings, day)
    metadata: dict[str, dg.RawMetadataValue] = {
        "as_of": str(day),
        "carts_compared": report.rows,
        "carts_without_streamed_session": report.skipped_unstreamed,
        "features_compared": report.features_compared,
        "model_version": report.model_version,
        "max_probability_difference": report.max_probability_difference,
        "mismatches": dg.MetadataValue.json(report.mismatches[:20]),
    }
    if report.rows == 0 and not report.mismatches:
        return dg.AssetCheckResult(
            passed=True,
            description=f"not applicable: no streamed carts of the as-of day {day} in the "
            "training set",
            metadata=metadata,
        )
    return dg.AssetCheckResult(
        passed=report.passed,
        description=f"{report.rows} carts of {day}: "
        + ("served = offline" if report.passed else f"{len(report.mismatches)} mismatches"),
        metadata=metadata,
    )


@dg.asset_check(asset=serving_deployment)
def serving_follows_champion(platform: PlatformConfig) -> dg.AssetCheckResult:
    """Serving answers with the version the champion alias points at (waiting out the replicas'
    10 s poll): after a move by hand (rollback) the MLflow sensor runs this check."""
    settings = platform.settings()
    champion = registry.aliases(settings).get(settings.champion_alias)
    if champion is None:
        return dg.AssetCheckResult(passed=False, description="no champion alias")
    try:
        served = wait_for_version(settings, champion, timeout=30.0)
    except (RuntimeError, httpx.HTTPError) as exc:
        return dg.AssetCheckResult(
            passed=False, description=str(exc), metadata={"champion": champion}
        )
    return dg.AssetCheckResult(passed=True, metadata={"champion": champion, "served": served})
