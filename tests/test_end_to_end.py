"""The walking skeleton end to end: produce -> validate -> Dagster materializes every asset ->
Ray Serve answers, on the real embedded stack."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import date

import httpx
import pytest
import redis
from conftest import E2E_DAYS, E2E_EVENTS, E2E_FIRST_DAY, E2E_SEED, pipeline_settings

from easymlops import registry
from easymlops.demo import sample_requests, time_predictions
from easymlops.features import session_key
from easymlops.generator import generate_payloads
from easymlops.pipeline import run_pipeline
from easymlops.produce import produce_payloads
from easymlops.session_features import EVENT_PREFIX
from easymlops.settings import Settings
from easymlops.validate import run_validator
from easymlops_assets.resources import PlatformConfig, platform_resources

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


def newest_test_day(settings: Settings) -> date:
    from easymlops.warehouse import connect

    with connect(settings) as con:
        row = con.execute(
            "select max(event_date) from training_set where split = 'test'"
        ).fetchone()
    assert row is not None and row[0] is not None
    return row[0]


def test_events_to_served_prediction(e2e_settings: Settings) -> None:
    settings = e2e_settings
    payloads = generate_payloads(
        E2E_EVENTS, days=E2E_DAYS, seed=E2E_SEED, start=E2E_FIRST_DAY, invalid_ratio=0.01
    )
    produced = produce_payloads(settings, payloads)
    assert produced.delivered == E2E_EVENTS
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
            run = dg.materialize(
                [serving_deployment],
                instance=instance,
                resources=platform_resources(),
                raise_on_error=False,
            )
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
    from easymlops_assets.defs.features.assets import (
        online_features,
        online_features_match_warehouse,
    )
    from easymlops_assets.defs.serving.assets import (
        served_predictions_match_training,
        serving_deployment,
    )

    settings = e2e_settings
    day = newest_test_day(settings)
    definitions = [
        online_features,
        online_features_match_warehouse,
        serving_deployment,
        served_predictions_match_training,
    ]
    with dg.DagsterInstance.get() as instance:
        run = dg.materialize(
            definitions,
            instance=instance,
            resources=platform_resources(),
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

    # Plant a skew: one user feature off by one in Redis for every user. Both checks, run by
    # Dagster on their own (the store is not rewritten), fail and name it.
    client = redis.Redis.from_url(settings.redis)
    for key in client.scan_iter(match="feat:user:*"):
        if client.hexists(key, "user_views"):
            client.hincrbyfloat(key, "user_views", 1.0)
    with dg.DagsterInstance.get() as instance:
        rerun = dg.materialize(
            definitions,
            selection=dg.AssetSelection.checks(
                online_features_match_warehouse, served_predictions_match_training
            ),
            instance=instance,
            resources=platform_resources(),
            raise_on_error=False,
        )
    for name in ("online_features_match_warehouse", "served_predictions_match_training"):
        evaluation = _check(rerun, name)
        assert not evaluation.passed, (name, evaluation.metadata)  # type: ignore[attr-defined]
        mismatches = evaluation.metadata["mismatches"].value  # type: ignore[attr-defined]
        assert any("user_views" in str(m) for m in mismatches), (name, mismatches)
    # Back to today's features for the tests that follow.
    online_store.materialize(settings)


def test_batch_scores_equal_predict_for_the_same_carts(e2e_settings: Settings) -> None:
    """cart_scores of a day (one Dagster run) and /predict/batch of the same carts, with the
    online store as of that day, give the same probabilities."""
    import dagster as dg
    import polars as pl

    from easymlops import online_store
    from easymlops.warehouse import connect
    from easymlops_assets.defs.monitoring.assets import cart_scores

    settings = e2e_settings
    day = newest_test_day(settings)
    online_store.materialize(settings, as_of=day)
    try:
        with dg.DagsterInstance.get() as instance:
            run = dg.materialize(
                [cart_scores],
                instance=instance,
                resources=platform_resources(),
                partition_key=str(day),
            )
        assert run.success
        with connect(settings) as con:
            scores = con.execute(
                "select * from cart_scores where event_date = ? order by event_time, event_id",
                [day],
            ).pl()
        lake_scores = pl.read_parquet(
            f"{settings.lake}/gold/cart_scores/event_date={day}/scores.parquet"
        )
        assert scores.height == lake_scores.height > 50
        assert scores["event_id"].n_unique() == scores.height
        sample = scores.gather_every(max(1, scores.height // 100))
        with connect(settings) as con:
            carts = con.execute(
                "select event_id, event_time, user_id, product_id, user_session, price "
                "from fct_cart_events where event_id in (select unnest(?))",
                [sample["event_id"].to_list()],
            ).pl()
        from easymlops.parity import request_body

        bodies = {r["event_id"]: request_body(r) for r in carts.to_dicts()}
        ordered = sample["event_id"].to_list()
        response = httpx.post(
            f"{settings.serve_url}/predict/batch",
            json={"requests": [bodies[e] for e in ordered]},
            timeout=60,
        )
        assert response.status_code == 200, response.text
        served = [p["probability"] for p in response.json()["predictions"]]
        versions = {p["model_version"] for p in response.json()["predictions"]}
        assert versions == set(sample["model_version"].to_list())
        differences = [abs(a - b) for a, b in zip(served, sample["probability"], strict=True)]
        assert max(differences) <= 1e-6, max(differences)
        # Not everything equal by accident: the carts get different scores.
        assert len({round(p, 6) for p in served}) > len(served) // 2
    finally:
        online_store.materialize(settings)


def _check(run: object, name: str) -> object:
    return next(
        e.event_specific_data
        for e in run.all_events  # type: ignore[attr-defined]
        if e.event_type_value == "ASSET_CHECK_EVALUATION"
        and e.event_specific_data.check_name == name  # type: ignore[union-attr]
    )


def test_live_performance_drift_and_the_retraining_it_requests(
    e2e_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the tests above posted carts of the held-out day D: their logged predictions land
    and are scored against their realized labels, planted predictions with known outcomes
    (always right, always wrong) score AUC 1 and 0; D has no drift against the champion's
    reference, a planted copy of D with prices x3 fails the drift check naming price, and the
    failure requests one retraining."""
    import json
    from datetime import UTC, datetime, timedelta

    import dagster as dg

    from easymlops.kafka import producer
    from easymlops.settings import get_settings
    from easymlops.warehouse import connect
    from easymlops_assets.defs.automation.sensors import drift_retraining_sensor
    from easymlops_assets.defs.lakehouse.assets import bronze_predictions
    from easymlops_assets.defs.monitoring.assets import feature_drift, live_performance

    settings = e2e_settings
    with connect(settings) as con:
        row = con.execute("select max(event_date) from cart_scores").fetchone()
    assert row is not None and row[0] is not None
    day = row[0]
    with dg.DagsterInstance.get() as instance:
        landed = dg.materialize(
            [bronze_predictions], instance=instance, resources=platform_resources()
        )
        assert landed.success
        live = dg.materialize(
            [live_performance],
            instance=instance,
            resources=platform_resources(),
            partition_key=str(day),
        )
        assert _check(live, "live_auc_close_to_offline").passed  # type: ignore[attr-defined]
        table = live.asset_materializations_for_node("live_performance")[0].metadata
        by_version = table["by_day_and_version"].value[str(day)]  # type: ignore[index]
        served_version = registry.aliases(settings)["champion"]
        assert by_version[served_version]["labelled"] >= 50

        # Known outcomes: predictions of two made-up versions for D's labelled carts, one always
        # right (probability = label), one always wrong, sent to the topic as serving sends them.
        with connect(settings) as con:
            carts = con.execute(
                "select event_id, event_time, label from training_set where event_date = ?", [day]
            ).pl()
        client = producer(settings)
        for version, right in (("9001", True), ("9002", False)):
            for cart in carts.iter_rows(named=True):
                label = float(cart["label"])
                record = {
                    "request_id": f"{version}-{cart['event_id']}",
                    "predicted_at": datetime.now(UTC).isoformat(),
                    "model_version": version,
                    "event_id": cart["event_id"],
                    "scored_at": cart["event_time"].replace(tzinfo=UTC).isoformat(),
                    "probability": label if right else 1.0 - label,
                }
                client.produce(settings.topic_predictions, json.dumps(record).encode())
        assert client.flush(30) == 0
        assert dg.materialize(
            [bronze_predictions], instance=instance, resources=platform_resources()
        ).success
        live = dg.materialize(
            [live_performance],
            instance=instance,
            resources=platform_resources(),
            partition_key=str(day),
        )
        table = live.asset_materializations_for_node("live_performance")[0].metadata
        by_version = table["by_day_and_version"].value[str(day)]  # type: ignore[index]
        assert by_version["9001"]["labelled"] == by_version["9002"]["labelled"] == carts.height
        assert by_version["9001"]["auc"] == 1.0 and by_version["9002"]["auc"] == 0.0
        assert by_version["9001"]["brier"] == 0.0 and by_version["9002"]["brier"] == 1.0
        assert by_version["9001"]["offline_auc"] is None  # no such registered version

        # The check's failure path: a margin no model meets.
        monkeypatch.setenv("EASYMLOPS_LIVE_AUC_MARGIN", "-1")
        get_settings.cache_clear()
        strict = dg.materialize(
            [live_performance],
            instance=instance,
            resources=platform_resources(),
            partition_key=str(day),
        )
        assert not _check(strict, "live_auc_close_to_offline").passed  # type: ignore[attr-defined]
        monkeypatch.delenv("EASYMLOPS_LIVE_AUC_MARGIN")
        get_settings.cache_clear()

        stable = dg.materialize(
            [feature_drift],
            instance=instance,
            resources=platform_resources(),
            partition_key=str(day),
        )
        assert _check(stable, "features_not_drifted").passed  # type: ignore[attr-defined]

        shifted_day = day + timedelta(days=1)
        with connect(settings, read_only=False) as con:
            con.execute("delete from cart_scores where event_date = ?", [shifted_day])
            con.execute(
                "insert into cart_scores select * replace (price * 3 as price, "
                "event_date + 1 as event_date) from cart_scores where event_date = ?",
                [day],
            )
        first = drift_retraining_sensor(
            dg.build_sensor_context(instance=instance), platform=PlatformConfig()
        )
        shifted = dg.materialize(
            [feature_drift],
            instance=instance,
            resources=platform_resources(),
            partition_key=str(shifted_day),
        )
        failed = _check(shifted, "features_not_drifted")
        assert not failed.passed  # type: ignore[attr-defined]
        assert failed.severity == dg.AssetCheckSeverity.ERROR  # type: ignore[attr-defined]
        assert failed.description.startswith("drift past PSI 0.25: price")  # type: ignore[attr-defined]

        # One retraining requested; a second failure within the interval requests none.
        assert isinstance(first, dg.SensorResult) and not first.run_requests
        context = dg.build_sensor_context(instance=instance, cursor=first.cursor)
        requested = drift_retraining_sensor(context, platform=PlatformConfig())
        assert isinstance(requested, dg.SensorResult)
        (request,) = requested.run_requests or []
        assert request.tags["easymlops/trigger"] == "drift"
        assert "dagster/asset_partition_range_end" in request.tags
        dg.materialize(
            [feature_drift],
            instance=instance,
            resources=platform_resources(),
            partition_key=str(shifted_day),
        )
        again = drift_retraining_sensor(
            dg.build_sensor_context(instance=instance, cursor=requested.cursor),
            platform=PlatformConfig(),
        )
        assert isinstance(again, dg.SensorResult) and not again.run_requests
        assert "at most one per" in str(again.skip_reason)


def test_the_exploration_notebook_runs_on_the_pipelines_data(e2e_settings: Settings) -> None:
    """notebooks/explore.py, every cell, as a script: it reads the lake, the warehouse, MLflow
    and the landed predictions of the tests above through the library."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    notebook = Path(__file__).parents[1] / "notebooks" / "explore.py"
    done = subprocess.run(
        [sys.executable, str(notebook)],
        env=os.environ.copy(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("notebook:"))
    assert " 0 silver days" not in line and "champion none" not in line, line
    assert " 0 live performance rows" not in line, line
