"""Train and evaluate the purchase-propensity model on the point-in-time training set.

Time decides every split, so no model is ever scored on rows older than what it learnt from:

    | train: fit (tuning trials learn here) | train: validation (trials are scored) | test |
      ------------------------------------ `validation_days` ----------- `holdout_days` --

1. Ray Tune searches the XGBoost parameters (`easymlops.tuning`): each trial fits on the fit
   days and is scored, round by round, on the validation days (ASHA stops weak trials).
2. The best configuration is refitted once on fit + validation, with the number of rounds its
   trial reached its best validation AUC at.
3. That model is scored once on the held-out test days: AUC with a bootstrap interval,
   logloss, Brier score, PR-AUC, a calibration table and the price-only baseline's AUC. Where
   the generator's ground truth is known (`easymlops.truth`) also the oracle AUC on the same
   rows and the model/oracle ratio. The truth is read for evaluation only, never as a feature.

Only mature carts reach any split (dbt `training_set`: their session is over, so their label
is final).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from easymlops import gate, warehouse
from easymlops.features import LABEL, MODEL_FEATURES
from easymlops.settings import Settings

if TYPE_CHECKING:
    import xgboost as xgb

    from easymlops.tuning import SearchResult

# The naive baseline the gate compares against: what a model knows from the request alone.
BASELINE_FEATURES: tuple[str, ...] = ("price",)
BASELINE_PARAMS: dict[str, Any] = {
    "objective": "binary:logistic",
    "eval_metric": "auc",
    "max_depth": 3,
    "eta": 0.1,
    "nthread": 2,
    "seed": 7,
}
MAX_ROUNDS = 400
EARLY_STOPPING_ROUNDS = 30
CALIBRATION_BINS = 10


@dataclass
class TrainingData:
    train: pl.DataFrame
    test: pl.DataFrame

    @property
    def test_start(self) -> str:
        return str(self.test["event_date"].min()) if self.test.height else ""

    def dates(self, frame: pl.DataFrame) -> list[str]:
        return [str(d) for d in frame["event_date"].unique().sort()]

    def fit_and_validation(self, validation_days: int) -> tuple[pl.DataFrame, pl.DataFrame]:
        """The train split cut by time: its last `validation_days` dates score the tuning
        trials, the dates before them are what the trials learn from."""
        dates = self.train["event_date"].unique().sort()
        if len(dates) <= validation_days:
            raise ValueError(
                f"the train split spans {len(dates)} day(s): tuning needs more than "
                f"validation_days={validation_days} (produce more days of events)"
            )
        first_valid = dates[len(dates) - validation_days]
        return (
            self.train.filter(pl.col("event_date") < first_valid),
            self.train.filter(pl.col("event_date") >= first_valid),
        )

    def fingerprint(self) -> str:
        """sha256 of the training and test rows (ids, labels, features, in row order): two
        models with the same fingerprint learnt from and were scored on the same data."""
        digest = hashlib.sha256()
        for frame in (self.train, self.test):
            digest.update(frame.hash_rows(seed=0).to_numpy().tobytes())
        return digest.hexdigest()


def load_training_data(settings: Settings) -> TrainingData:
    frame = warehouse.query_frame(
        settings,
        f"select event_id, split, event_date, {LABEL}, {', '.join(MODEL_FEATURES)} "
        # A total order: a database returns rows in any order, and row order decides the
        # model; the same data must give the same model (on DuckDB as on PostgreSQL).
        "from training_set order by event_time, event_id",
    )
    return TrainingData(
        train=frame.filter(pl.col("split") == "train"), test=frame.filter(pl.col("split") == "test")
    )


def features_matrix(frame: pl.DataFrame, columns: tuple[str, ...] = MODEL_FEATURES) -> np.ndarray:
    """Model input in `columns` order, float64, NaN where a feature is missing."""
    return frame.select(pl.col(c).cast(pl.Float64) for c in columns).to_numpy()


def labels(frame: pl.DataFrame) -> np.ndarray:
    return frame[LABEL].to_numpy().astype(np.int64)


def _dmatrix(frame: pl.DataFrame, columns: tuple[str, ...]) -> xgb.DMatrix:
    import xgboost as xgb

    return xgb.DMatrix(
        features_matrix(frame, columns),
        label=labels(frame),
        feature_names=list(columns),
        missing=np.nan,
    )


def fit(
    frame: pl.DataFrame,
    params: dict[str, Any],
    rounds: int,
    columns: tuple[str, ...] = MODEL_FEATURES,
) -> xgb.Booster:
    """A booster of exactly `rounds` trees on every row of `frame` (no early stopping: the
    rounds were chosen on validation data beforehand)."""
    import xgboost as xgb

    return xgb.train(params, _dmatrix(frame, columns), num_boost_round=rounds, verbose_eval=False)


def fit_early_stopped(
    fit_rows: pl.DataFrame,
    valid_rows: pl.DataFrame,
    params: dict[str, Any],
    columns: tuple[str, ...],
) -> int:
    """Rounds at which `params` reach their best validation AUC (fit on `fit_rows`)."""
    import xgboost as xgb

    booster = xgb.train(
        params,
        _dmatrix(fit_rows, columns),
        num_boost_round=MAX_ROUNDS,
        evals=[(_dmatrix(valid_rows, columns), "validation")],
        early_stopping_rounds=EARLY_STOPPING_ROUNDS,
        verbose_eval=False,
    )
    return int(booster.best_iteration) + 1


def predict(booster: xgb.Booster, frame: pl.DataFrame) -> np.ndarray:
    """Scores of `frame` by a booster trained on MODEL_FEATURES (or the baseline's columns)."""
    import xgboost as xgb

    columns = tuple(booster.feature_names or MODEL_FEATURES)
    matrix = xgb.DMatrix(
        features_matrix(frame, columns), feature_names=list(columns), missing=np.nan
    )
    return np.asarray(booster.predict(matrix), dtype=np.float64)


def calibration_table(
    y: np.ndarray, scores: np.ndarray, bins: int = CALIBRATION_BINS
) -> list[dict]:
    """Per equal-width probability bin: rows, mean predicted probability, observed rate."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(scores, edges[1:-1]), 0, bins - 1)
    table = []
    for b in range(bins):
        mask = which == b
        if mask.any():
            table.append(
                {
                    "bin": f"[{edges[b]:.1f}, {edges[b + 1]:.1f})",
                    "rows": int(mask.sum()),
                    "mean_predicted": float(scores[mask].mean()),
                    "observed_rate": float(y[mask].mean()),
                }
            )
    return table


def evaluate(y: np.ndarray, scores: np.ndarray, *, resamples: int, seed: int) -> dict[str, float]:
    """Held-out metrics of one model's scores."""
    from sklearn.metrics import average_precision_score, brier_score_loss, log_loss

    interval = gate.auc_interval(y, scores, gate.bootstrap_indices(len(y), resamples, seed))
    return {
        "test_auc": interval.estimate,
        "test_auc_ci_low": interval.low,
        "test_auc_ci_high": interval.high,
        "test_logloss": float(log_loss(y, np.clip(scores, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "test_brier": float(brier_score_loss(y, scores)),
        "test_pr_auc": float(average_precision_score(y, scores)),
        "test_positive_rate": float(y.mean()),
    }


def baseline_model(data: TrainingData, settings: Settings) -> xgb.Booster:
    """The price-only baseline, chosen and refitted on the same splits as the model."""
    fit_rows, valid_rows = data.fit_and_validation(settings.validation_days)
    rounds = fit_early_stopped(fit_rows, valid_rows, BASELINE_PARAMS, BASELINE_FEATURES)
    return fit(data.train, BASELINE_PARAMS, rounds, BASELINE_FEATURES)


def calibration_figure(table: list[dict]) -> Any:
    """Reliability diagram of `calibration_table` (a matplotlib figure, for MLflow)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    figure = Figure(figsize=(4.5, 4.5))
    axes = figure.subplots()
    axes.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfectly calibrated")
    axes.plot(
        [row["mean_predicted"] for row in table],
        [row["observed_rate"] for row in table],
        marker="o",
        label="model",
    )
    axes.set_xlabel("mean predicted probability")
    axes.set_ylabel("observed purchase rate")
    axes.set_title("Calibration on the held-out days")
    axes.legend(loc="upper left")
    figure.tight_layout()
    return figure


@dataclass
class TrainedModel:
    booster: xgb.Booster
    params: dict[str, Any]
    rounds: int
    search: SearchResult
    metrics: dict[str, float]
    test_scores: np.ndarray
    baseline_scores: np.ndarray
    oracle_scores: np.ndarray | None
    calibration: list[dict]
    importance: dict[str, float]
    notes: list[str] = field(default_factory=list)


def oracle_scores(settings: Settings, test: pl.DataFrame) -> tuple[np.ndarray | None, float]:
    """The generator's true purchase probabilities of the test rows, in row order, and the
    share of rows that have one; None unless every row has one (replayed real data has none;
    a mix cannot be compared with the model on the same rows)."""
    from easymlops import truth

    known = truth.load(settings, test["event_id"].to_list())
    coverage = known.height / test.height if test.height else 0.0
    if known.height < test.height:
        return None, coverage
    joined = test.select("event_id").join(known, on="event_id", how="left", maintain_order="left")
    return joined["purchase_probability"].to_numpy().astype(np.float64), coverage


def train_tuned(
    data: TrainingData,
    settings: Settings,
    *,
    progress: Callable[[str], None] | None = None,
    space_overrides: dict[str, Any] | None = None,
) -> TrainedModel:
    """Tune, refit on fit + validation, score once on the test days (module docstring)."""
    from easymlops import tuning

    if data.train.height < 50 or data.test.height < 10:
        raise ValueError(
            f"training set too small: {data.train.height} train / {data.test.height} test rows"
        )
    fit_rows, valid_rows = data.fit_and_validation(settings.validation_days)
    search = tuning.search(
        features_matrix(fit_rows),
        labels(fit_rows),
        features_matrix(valid_rows),
        labels(valid_rows),
        feature_names=MODEL_FEATURES,
        trials=settings.tune_trials,
        time_budget_s=settings.tune_time_budget_seconds,
        concurrency=settings.tune_concurrency,
        threads_per_trial=settings.tune_threads_per_trial,
        seed=settings.tune_seed,
        max_rounds=MAX_ROUNDS,
        early_stopping_rounds=EARLY_STOPPING_ROUNDS,
        ray_address=settings.ray,
        progress=progress,
        space_overrides=space_overrides,
    )
    params = {**search.best_config, "nthread": 2}
    booster = fit(data.train, params, search.best_rounds)

    baseline = baseline_model(data, settings)

    y = labels(data.test)
    scores = predict(booster, data.test)
    baseline_scores = predict(baseline, data.test)
    seed = settings.tune_seed
    metrics = evaluate(y, scores, resamples=settings.gate_bootstrap, seed=seed)
    metrics["baseline_test_auc"] = gate.auc(y, baseline_scores)
    notes: list[str] = []
    truth_scores, coverage = oracle_scores(settings, data.test)
    metrics["oracle_coverage"] = coverage
    if truth_scores is not None:
        metrics["oracle_test_auc"] = gate.auc(y, truth_scores)
        metrics["model_oracle_ratio"] = metrics["test_auc"] / metrics["oracle_test_auc"]
    else:
        notes.append(
            f"no ground truth for {1 - coverage:.0%} of the test rows (replayed real data?): "
            "oracle AUC not applicable"
        )
    metrics.update(
        train_rows=float(data.train.height),
        fit_rows=float(fit_rows.height),
        validation_rows=float(valid_rows.height),
        test_rows=float(data.test.height),
        trees=float(booster.num_boosted_rounds()),
        early_stopping_rounds=float(EARLY_STOPPING_ROUNDS),
        tune_trials=float(len(search.trials)),
        tune_failed_trials=float(search.failed_trials),
        tune_best_valid_auc=search.best_valid_auc,
        tune_wall_seconds=search.wall_seconds,
    )
    # total_gain is one float per feature (lists are only for multi-output models)
    gains = {k: float(v) for k, v in booster.get_score(importance_type="total_gain").items()}  # type: ignore[arg-type]
    total = sum(gains.values()) or 1.0
    importance = {name: gains.get(name, 0.0) / total for name in MODEL_FEATURES}
    return TrainedModel(
        booster=booster,
        params=params,
        rounds=search.best_rounds,
        search=search,
        metrics={k: float(v) for k, v in metrics.items() if math.isfinite(float(v))},
        test_scores=scores,
        baseline_scores=baseline_scores,
        oracle_scores=truth_scores,
        calibration=calibration_table(y.astype(np.float64), scores),
        importance=importance,
        notes=notes,
    )
