"""The walking skeleton end to end: produce -> validate -> Dagster materializes every asset ->
Ray Serve answers, on the real embedded stack."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from easymlops.demo import sample_requests, time_predictions
from easymlops.generator import generate_payloads
from easymlops.pipeline import run_pipeline
from easymlops.produce import produce_payloads
from easymlops.settings import Settings, get_settings
from easymlops.validate import run_validator

pytestmark = [pytest.mark.services, pytest.mark.e2e]


@pytest.fixture(scope="module")
def e2e_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The session stack, with a model name and Dagster home of this test's own, so models
    registered by other tests cannot influence the promotion gate here."""
    patch = pytest.MonkeyPatch()
    patch.setenv("EASYMLOPS_MODEL_NAME", "purchase_propensity_e2e")
    patch.setenv("DAGSTER_HOME", str(tmp_path_factory.mktemp("dagster-home")))
    get_settings.cache_clear()
    try:
        yield get_settings()
    finally:
        patch.undo()
        get_settings.cache_clear()


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
    assert result.checks and all(result.checks.values()), result.checks
    m = result.materializations
    assert m["silver_events"]["dagster/row_count"] > 15_000
    assert m["training_set"]["dagster/row_count"] > 200
    model = m["purchase_model"]
    assert model["test_auc"] > model["baseline_test_auc"]
    assert m["serving_deployment"]["model_version"] == model["model_version"]

    requests = sample_requests(settings, 20)
    timing = time_predictions(settings, requests)
    assert timing["model_version"] == model["model_version"]
    assert 0.0 < timing["mean_probability"] < 1.0

    body = dict(requests[0])
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
