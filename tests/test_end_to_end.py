"""The walking skeleton end to end: produce -> validate -> Dagster materializes every asset ->
Ray Serve answers, on the real embedded stack."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
import redis
from conftest import pipeline_settings

from easymlops import registry
from easymlops.demo import sample_requests, time_predictions
from easymlops.features import session_key
from easymlops.generator import generate_payloads
from easymlops.pipeline import run_pipeline
from easymlops.produce import produce_payloads
from easymlops.session_features import EVENT_PREFIX
from easymlops.settings import Settings
from easymlops.validate import run_validator

pytestmark = [pytest.mark.services, pytest.mark.e2e]


@pytest.fixture(scope="module")
def e2e_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The session stack with a model, Dagster home, topics and lake of this test's own; serving
    reports the feature values it used (the parity test compares them)."""
    patch = pytest.MonkeyPatch()
    patch.setenv("EASYMLOPS_SERVE_DEBUG_FEATURES", "true")
    try:
        with pipeline_settings(tmp_path_factory.mktemp("e2e"), "e2e") as settings:
            yield settings
    finally:
        patch.undo()


def test_events_to_served_prediction(e2e_settings: Settings) -> None:
    settings = e2e_settings
    produced = produce_payloads(
        settings, generate_payloads(20_000, days=5, seed=11, invalid_ratio=0.01)
    )
    assert produced.delivered == 20_000
    validated = run_validator(settings, idle_seconds=3)
    assert validated.valid + validated.invalid == validated.consumed

    result = run_pipeline(settings)
    assert result.success, result.failures
    # Every check passes but the oracle one, which only warns: a model trained on 20,000 events
    # learns less of the generator's behaviour than the demo's (its ratio is in the metadata).
    failed = {k for k, passed in result.checks.items() if not passed}
    assert result.checks and failed <= {"purchase_model:model_close_to_oracle"}, failed
    m = result.materializations
    # The landing run's counts are part of the result (the main run does not land again).
    assert (result.rows("bronze_events") or 0) >= validated.valid
    # One silver (and fct_cart_events) partition per event date, each with its own row count.
    silver = result.partitions["silver_events"]
    assert len(silver) >= 5 and sorted(silver) == sorted(result.partitions["fct_cart_events"])
    assert sum(p["dagster/row_count"] for p in silver.values()) > 15_000
    assert m["training_set"]["dagster/row_count"] > 200
    model = m["purchase_model"]
    assert model["test_auc"] > model["baseline_test_auc"]
    assert m["serving_deployment"]["model_version"] == model["model_version"]

    requests = sample_requests(settings, 20)
    timing = time_predictions(settings, requests)
    assert timing["model_version"] == model["model_version"]
    assert 0.0 < timing["mean_probability"] < 1.0

    body = dict(requests[0])
    # The validator kept this session's events in Redis while they streamed, the scored cart
    # itself included (serving counts only those before it).
    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    session = client.hgetall(session_key(body["user_session"]))
    assert f"{EVENT_PREFIX}{body['event_id']}" in session, session
    response = httpx.post(f"{settings.serve_url}/predict", json=body, timeout=10)
    assert response.status_code == 200
    payload = response.json()
    assert 0.0 <= payload["probability"] <= 1.0
    assert payload["model_name"] == "purchase_propensity_e2e"
    assert "user_sessions" not in payload["missing_features"]  # user is in the online store

    del body["user_id"]
    rejected = httpx.post(f"{settings.serve_url}/predict", json=body, timeout=10)
    assert rejected.status_code == 422
    assert "user_id" in rejected.text


def test_serving_deployment_refuses_a_version_that_failed_the_gate(e2e_settings: Settings) -> None:
    """Materialized on its own, after the gate failed for the latest version, the deployment
    fails with the gate's reason and leaves the champion where it was (runs after the test
    above, on the model it registered)."""
    import dagster as dg

    from easymlops_assets.defs.serving.assets import serving_deployment
    from easymlops_assets.defs.training.assets import latest_model_version

    settings = e2e_settings
    with dg.DagsterInstance.get() as instance:
        version = latest_model_version(instance)
        assert registry.gate_verdict(version, settings)[0] == "passed"
        champion = registry.champion(settings)
        registry.record_gate(version, False, "test: AUC regressed", settings)
        try:
            run = dg.materialize([serving_deployment], instance=instance, raise_on_error=False)
        finally:
            registry.record_gate(version, True, "challenger may be promoted", settings)
    assert not run.success
    failure = next(e for e in run.all_events if e.event_type_value == "STEP_FAILURE")
    message = failure.event_specific_data.error.message  # type: ignore[union-attr]
    assert f"version {version}" in message and "test: AUC regressed" in message, message
    assert registry.champion(settings) == champion


def test_served_predictions_equal_the_offline_ones_for_carts_of_a_held_out_day(
    e2e_settings: Settings,
) -> None:
    """Parity through HTTP: with the online store materialized as of the newest held-out day,
    that day's carts (their whole sessions streamed, later events included) posted with their
    event_time and event_id get the training row's features and the offline probability; and
    the checks that say so fail once Redis disagrees with the warehouse."""
    import dagster as dg

    from easymlops import online_store, parity
    from easymlops.warehouse import connect
    from easymlops_assets.defs.features.assets import (
        online_features,
        online_features_match_warehouse,
    )
    from easymlops_assets.defs.serving.assets import (
        served_predictions_match_training,
        serving_deployment,
    )

    settings = e2e_settings
    with connect(settings) as con:
        row = con.execute(
            "select max(event_date) from training_set where split = 'test'"
        ).fetchone()
    assert row is not None and row[0] is not None
    day = row[0]
    with dg.DagsterInstance.get() as instance:
        run = dg.materialize(
            [
                online_features,
                online_features_match_warehouse,
                serving_deployment,
                served_predictions_match_training,
            ],
            instance=instance,
            run_config={"ops": {"online_features": {"config": {"as_of": str(day)}}}},
            raise_on_error=False,
        )
    assert run.success
    checks = {
        e.event_specific_data.check_name: e.event_specific_data  # type: ignore[union-attr]
        for e in run.all_events
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
    }
    store = checks["online_features_match_warehouse"]
    assert store.passed, store.metadata
    assert store.metadata["compared_with"].value == "training_set join"
    served = checks["served_predictions_match_training"]
    assert served.passed, served.metadata
    assert served.metadata["carts_compared"].value >= 20
    assert served.metadata["features_compared"].value is True
    assert served.metadata["max_probability_difference"].value <= parity.PROBABILITY_TOLERANCE

    # Plant a skew: one user feature off by one in Redis for every user. Both comparisons see it.
    client = redis.Redis.from_url(settings.redis)
    for key in client.scan_iter(match="feat:user:*"):
        if client.hexists(key, "user_views"):
            client.hincrbyfloat(key, "user_views", 1.0)
    skewed = parity.compare(settings, day)
    assert any("user_views" in m for m in skewed.mismatches), skewed
    _, _, _, mismatches = online_store.compare_with_warehouse(settings, day)
    assert any("user_views" in m for m in mismatches)
    # Back to today's features for the tests that follow.
    online_store.materialize(settings)
