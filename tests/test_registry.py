"""easymlops.registry against the real MLflow server of the embedded stack."""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest
import xgboost
from mlflow.exceptions import MlflowException

from easymlops import registry
from easymlops.features import FEATURE_SET_VERSION, MODEL_FEATURES
from easymlops.settings import Settings

pytestmark = pytest.mark.services


def tiny_booster(seed: int, rounds: int = 4) -> tuple[xgboost.Booster, xgboost.DMatrix]:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, len(MODEL_FEATURES)))
    y = (x[:, 0] + rng.normal(scale=0.5, size=300) > 0).astype(int)
    data = xgboost.DMatrix(x, label=y, feature_names=list(MODEL_FEATURES))
    params = {"objective": "binary:logistic", "max_depth": 2, "seed": seed}
    return xgboost.train(params, data, num_boost_round=rounds), data


@pytest.fixture(scope="module")
def settings(stack: Settings) -> Settings:
    # A model name of its own, so other tests of the session (and their aliases) do not interfere.
    return stack.model_copy(update={"model_name": "test_registry_model"})


def test_register_promote_load_round_trip(settings: Settings, tmp_path: Path) -> None:
    assert registry.champion(settings) is None  # no registered model yet

    first, data = tiny_booster(seed=1)
    second, _ = tiny_booster(seed=2, rounds=6)
    v1 = registry.log_and_register(
        first,
        params={"max_depth": 2, "rounds": 4},
        metrics={"val_auc": 0.71, "val_logloss": 0.6},
        settings=settings,
        tags={"trigger": "test"},
        run_name="first",
    )
    assert registry.champion(settings) is None  # registered is not promoted
    v2 = registry.log_and_register(
        second, params={"max_depth": 2, "rounds": 6}, metrics={"val_auc": 0.74}, settings=settings
    )
    assert (v1.name, v2.name) == (settings.model_name, settings.model_name)
    assert int(v2.version) == int(v1.version) + 1
    assert v1.run_id != v2.run_id
    assert v1.model_uri == f"models:/{settings.model_name}/{v1.version}"
    assert v1.feature_set_version == FEATURE_SET_VERSION

    tags = registry.client(settings).get_model_version(settings.model_name, v1.version).tags
    assert tags[registry.FEATURE_SET_VERSION_TAG] == FEATURE_SET_VERSION
    assert tags["trigger"] == "test"

    assert registry.gate_verdict(v1.version, settings) == ("not gated", "")
    registry.record_gate(v1.version, False, "AUC 0.5 does not beat the baseline", settings)
    assert registry.gate_verdict(v1.version, settings) == (
        "failed",
        "AUC 0.5 does not beat the baseline",
    )
    registry.record_gate(v1.version, True, "challenger may be promoted", settings)
    assert registry.gate_verdict(v1.version, settings)[0] == "passed"
    assert registry.gate_verdict(v2.version, settings)[0] == "not gated"

    registry.promote(v1.version, settings)
    assert registry.champion(settings) == v1
    registry.promote(v2.version, settings)
    assert registry.champion(settings) == v2
    registry.promote(v1.version, settings)  # rollback is just moving the alias back
    assert registry.champion(settings) == v1

    assert registry.version_metrics(v1.version, settings) == {"val_auc": 0.71, "val_logloss": 0.6}
    assert registry.version_metrics(v2.version, settings) == {"val_auc": 0.74}

    # Loading must not depend on the process-wide MLflow URIs (a Serve replica never sets
    # them; MLflow 3 would resolve `models:/` against them): point them elsewhere first.
    saved_tracking, saved_registry = mlflow.get_tracking_uri(), mlflow.get_registry_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    mlflow.set_registry_uri(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    try:
        by_alias = registry.load_booster(
            f"models:/{settings.model_name}@{settings.champion_alias}", settings
        )
        by_version = registry.load_booster(v2.model_uri, settings)
    finally:
        mlflow.set_tracking_uri(saved_tracking)
        mlflow.set_registry_uri(saved_registry)
    assert by_alias.feature_names == list(MODEL_FEATURES)
    np.testing.assert_allclose(by_alias.predict(data), first.predict(data), rtol=1e-6)
    np.testing.assert_allclose(by_version.predict(data), second.predict(data), rtol=1e-6)


def test_refuses_booster_with_other_features(settings: Settings) -> None:
    rng = np.random.default_rng(0)
    names = list(reversed(MODEL_FEATURES))
    data = xgboost.DMatrix(rng.normal(size=(50, len(names))), label=rng.integers(0, 2, 50))
    data.feature_names = names
    booster = xgboost.train({"objective": "binary:logistic"}, data, num_boost_round=1)
    with pytest.raises(ValueError, match="MODEL_FEATURES"):
        registry.log_and_register(booster, params={}, metrics={}, settings=settings)


def test_promote_unknown_version_fails(settings: Settings) -> None:
    with pytest.raises(MlflowException):
        registry.promote("9999", settings)
