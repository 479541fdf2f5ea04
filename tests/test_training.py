"""Training (`easymlops.training.train_tuned`) on a real warehouse file and the session's Ray
head: reproducible whatever order the warehouse returns rows in, time-ordered splits, held-out
metrics that are the metrics of the returned booster, and an oracle comparison only where the
ground truth covers every held-out row."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from easymlops import training, truth
from easymlops.features import LABEL, MODEL_FEATURES
from easymlops.settings import Settings

DAYS = 7


def synthetic_training_set(rows: int = 4000, seed: int = 3) -> tuple[pl.DataFrame, np.ndarray]:
    """A training_set-shaped table where the label depends on two features; returns it and the
    true purchase probability of each row."""
    rng = np.random.default_rng(seed)
    days = rng.integers(1, DAYS + 1, rows)
    features = {name: rng.normal(size=rows) for name in MODEL_FEATURES}
    # Not price: the price-only baseline must not see the signal.
    first, second = [name for name in MODEL_FEATURES if name != "price"][:2]
    signal = features[first] + 0.5 * features[second]
    probability = 1 / (1 + np.exp(-2.0 * signal))
    label = (rng.random(rows) < probability).astype(int)
    frame = pl.DataFrame(
        {
            "event_id": [f"e{i:06d}" for i in range(rows)],
            # Many rows share a day and some share a time: only event_id breaks those ties.
            "event_time": [f"2024-03-0{d} 12:00:00" for d in days],
            "event_date": [f"2024-03-0{d}" for d in days],
            "split": ["test" if d == DAYS else "train" for d in days],
            LABEL: label,
            **features,
        }
    ).with_columns(pl.col("event_time").str.to_datetime(), pl.col("event_date").str.to_date())
    return frame, probability


def settings_with(frame: pl.DataFrame, home: Path, stack: Settings) -> Settings:
    home.mkdir(parents=True, exist_ok=True)
    path = home / "warehouse.duckdb"
    with duckdb.connect(str(path)) as con:
        con.register("frame", frame.to_arrow())
        con.execute("create table training_set as select * from frame")
    return stack.model_copy(
        update={
            "home": home,
            "warehouse_path": str(path),
            "tune_trials": 3,
            "tune_concurrency": 2,
            "gate_bootstrap": 200,
        }
    )


def test_fit_and_validation_split_by_time_and_refuse_too_few_days() -> None:
    frame, _ = synthetic_training_set(rows=600)
    data = training.TrainingData(
        train=frame.filter(pl.col("split") == "train"), test=frame.filter(pl.col("split") == "test")
    )
    fit_rows, valid_rows = data.fit_and_validation(validation_days=2)
    assert fit_rows["event_date"].max() < valid_rows["event_date"].min()  # type: ignore[operator]
    assert valid_rows["event_date"].n_unique() == 2
    assert fit_rows.height + valid_rows.height == data.train.height
    with pytest.raises(ValueError, match="spans 6 day"):
        data.fit_and_validation(validation_days=6)


@pytest.mark.services
def test_tuned_model_is_reproducible_scored_on_its_own_test_rows_and_against_the_truth(
    stack: Settings, tmp_path: Path
) -> None:
    frame, probability = synthetic_training_set()
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=11)
    first_settings = settings_with(frame, tmp_path / "a", stack)
    first = training.load_training_data(first_settings)
    second = training.load_training_data(settings_with(shuffled, tmp_path / "b", stack))
    assert first.train.equals(second.train) and first.test.equals(second.test)
    assert first.fingerprint() == second.fingerprint()

    # Ground truth for every row of the first warehouse only.
    recorder = truth.TruthRecorder()
    for event_id, p in zip(frame["event_id"].to_list(), probability.tolist(), strict=True):
        recorder(event_id, p, p)
    recorder.write(first_settings, "training-test")

    a = training.train_tuned(first, first_settings)
    b = training.train_tuned(second, settings_with(shuffled, tmp_path / "c", stack))
    assert np.array_equal(a.test_scores, b.test_scores)
    assert a.params == b.params and a.rounds == b.rounds

    # The reported metrics are those of the returned booster on the test split.
    y = training.labels(first.test)
    scores = training.predict(a.booster, first.test)
    assert np.array_equal(scores, a.test_scores)
    assert a.metrics["test_auc"] == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert a.metrics["test_logloss"] == pytest.approx(log_loss(y, scores), abs=1e-9)
    assert a.metrics["test_auc_ci_low"] < a.metrics["test_auc"] < a.metrics["test_auc_ci_high"]
    assert a.metrics["test_auc"] > a.metrics["baseline_test_auc"] + 0.1  # the signal is learnt

    # The oracle is the truth of exactly these rows.
    oracle = roc_auc_score(y, probability[frame["split"].to_numpy() == "test"])
    assert a.metrics["oracle_test_auc"] == pytest.approx(oracle, abs=1e-12)
    assert a.metrics["model_oracle_ratio"] == pytest.approx(a.metrics["test_auc"] / oracle)
    assert 0.9 < a.metrics["model_oracle_ratio"] < 1.02
    # Without truth for the rows: no oracle figures, and a note that says why.
    assert "oracle_test_auc" not in b.metrics and b.metrics["oracle_coverage"] == 0.0
    assert any("oracle AUC not applicable" in note for note in b.notes)


def test_partial_truth_gives_no_oracle(tmp_path: Path) -> None:
    frame, probability = synthetic_training_set(rows=300)
    settings = Settings(home=tmp_path)
    recorder = truth.TruthRecorder()
    for event_id, p in list(zip(frame["event_id"].to_list(), probability.tolist(), strict=True))[
        :200
    ]:
        recorder(event_id, p, p)
    recorder.write(settings, "partial")
    scores, coverage = training.oracle_scores(settings, frame)
    assert scores is None and coverage == pytest.approx(200 / 300)
    full, coverage = training.oracle_scores(settings, frame.head(150))
    assert coverage == 1.0 and full is not None
    assert np.allclose(full, probability[:150])
