"""Training is reproducible: the same training set gives the same model, whatever order the
warehouse returns its rows in (row order decides the early-stopping cut)."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl

from easymlops import training
from easymlops.features import LABEL, MODEL_FEATURES
from easymlops.settings import Settings


def synthetic_training_set(rows: int = 4000, seed: int = 3) -> pl.DataFrame:
    """A training_set-shaped table where the label depends on two features."""
    rng = np.random.default_rng(seed)
    days = rng.integers(1, 8, rows)
    features = {name: rng.normal(size=rows) for name in MODEL_FEATURES}
    signal = features[MODEL_FEATURES[0]] + 0.5 * features[MODEL_FEATURES[1]]
    label = (signal + rng.normal(scale=1.0, size=rows) > 0).astype(int)
    return pl.DataFrame(
        {
            "event_id": [f"e{i:06d}" for i in range(rows)],
            # Many rows share a day and some share a time: only event_id breaks those ties.
            "event_time": [f"2024-03-0{d} 12:00:00" for d in days],
            "event_date": [f"2024-03-0{d}" for d in days],
            "split": ["test" if d == 7 else "train" for d in days],
            LABEL: label,
            **features,
        }
    ).with_columns(pl.col("event_time").str.to_datetime(), pl.col("event_date").str.to_date())


def warehouse_with(frame: pl.DataFrame, path: Path) -> Settings:
    con = duckdb.connect(str(path))
    con.register("frame", frame.to_arrow())
    con.execute("create table training_set as select * from frame")
    con.close()
    return Settings(warehouse_path=str(path))


def test_same_training_set_in_another_row_order_gives_the_same_model(tmp_path: Path) -> None:
    frame = synthetic_training_set()
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=11)
    first = training.load_training_data(warehouse_with(frame, tmp_path / "a.duckdb"))
    second = training.load_training_data(warehouse_with(shuffled, tmp_path / "b.duckdb"))
    assert first.train.equals(second.train) and first.test.equals(second.test)

    a, b = training.train(first), training.train(second)
    assert a.metrics == b.metrics
    assert a.metrics["test_auc"] > 0.7  # the synthetic signal is learnt
    test_matrix = training._matrix(first.test, MODEL_FEATURES)
    assert np.array_equal(a.booster.predict(test_matrix), b.booster.predict(test_matrix))
