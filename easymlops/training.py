"""Train and evaluate the purchase-propensity model on the point-in-time training set."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl
import xgboost as xgb
from sklearn.metrics import roc_auc_score

from easymlops.features import LABEL, MODEL_FEATURES
from easymlops.settings import Settings
from easymlops.warehouse import connect

DEFAULT_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "eval_metric": "auc",
    "max_depth": 5,
    "eta": 0.1,
    "subsample": 0.9,
    "colsample_bytree": 0.9,
    "min_child_weight": 2,
    "nthread": 2,
    "seed": 7,
}
# The naive baseline the gate compares against: what a model knows from the request alone.
BASELINE_FEATURES: tuple[str, ...] = ("price",)


@dataclass
class TrainingData:
    train: pl.DataFrame
    test: pl.DataFrame

    @property
    def test_start(self) -> str:
        return str(self.test["event_date"].min()) if self.test.height else ""


@dataclass
class TrainResult:
    booster: xgb.Booster
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)


def load_training_data(settings: Settings) -> TrainingData:
    with connect(settings) as con:
        frame = pl.from_arrow(
            con.execute(
                f"select split, event_date, {LABEL}, {', '.join(MODEL_FEATURES)} "
                # A total order: DuckDB returns rows in any order, and row order decides the
                # early-stopping cut and so the model; the same data must give the same model.
                "from training_set order by event_time, event_id"
            ).arrow()
        )
    assert isinstance(frame, pl.DataFrame)
    return TrainingData(
        train=frame.filter(pl.col("split") == "train"), test=frame.filter(pl.col("split") == "test")
    )


def _matrix(frame: pl.DataFrame, columns: tuple[str, ...]) -> xgb.DMatrix:
    values = frame.select(pl.col(c).cast(pl.Float64) for c in columns).to_numpy()
    return xgb.DMatrix(
        values, label=frame[LABEL].to_numpy(), feature_names=list(columns), missing=np.nan
    )


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    if len(np.unique(labels)) < 2:
        return float("nan")
    return float(roc_auc_score(labels, scores))


def train(
    data: TrainingData,
    *,
    params: dict[str, Any] | None = None,
    num_boost_round: int = 300,
    columns: tuple[str, ...] = MODEL_FEATURES,
) -> TrainResult:
    """Fit on the training period with early stopping on its last 20% (by row order, which is
    time order: load_training_data sorts), then score the held-out later period."""
    if data.train.height < 50 or data.test.height < 10:
        raise ValueError(
            f"training set too small: {data.train.height} train / {data.test.height} test rows"
        )
    params = {**DEFAULT_PARAMS, **(params or {})}
    ordered = data.train.sort("event_date", maintain_order=True)
    cut = int(ordered.height * 0.8)
    fit, early = ordered.head(cut), ordered.tail(ordered.height - cut)
    booster = xgb.train(
        params,
        _matrix(fit, columns),
        num_boost_round=num_boost_round,
        evals=[(_matrix(early, columns), "validation")],
        early_stopping_rounds=30,
        verbose_eval=False,
    )
    # Keep only the trees up to the best iteration, so serving predicts what was evaluated.
    booster = booster[: booster.best_iteration + 1]
    labels = data.test[LABEL].to_numpy()
    scores = booster.predict(_matrix(data.test, columns))
    metrics = {
        "test_auc": auc(labels, scores),
        "train_rows": float(data.train.height),
        "test_rows": float(data.test.height),
        "test_positive_rate": float(labels.mean()),
        "trees": float(booster.num_boosted_rounds()),
    }
    return TrainResult(booster=booster, params=params, metrics=metrics)


def train_with_baseline(data: TrainingData) -> TrainResult:
    """The full model, with the naive (request-only) baseline's AUC added to its metrics."""
    result = train(data)
    baseline = train(data, columns=BASELINE_FEATURES)
    result.metrics["baseline_test_auc"] = baseline.metrics["test_auc"]
    return result
