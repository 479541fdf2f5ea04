"""The promotion gate: its statistics (paired bootstrap of AUC differences) and each of its
refusals, driven through `easymlops.promotion.evaluate` with real boosters in the real MLflow
registry, a real warehouse file and a ground-truth file, as the Dagster check runs it."""

from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
import xgboost
from sklearn.metrics import roc_auc_score

from easymlops import gate, promotion, registry, truth
from easymlops.features import LABEL, MODEL_FEATURES
from easymlops.settings import Settings

# -- statistics -----------------------------------------------------------------------------------


def test_auc_matches_sklearn_with_ties() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    scores = np.round(rng.random(500) + 0.3 * y, 1)  # many tied scores
    assert gate.auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)


def test_paired_interval_is_narrower_than_the_unpaired_one() -> None:
    """Two close models on the same rows: the paired interval of their difference is much
    narrower than what two separate intervals would allow, which is why the gate pairs."""
    rng = np.random.default_rng(1)
    n = 800
    y = (rng.random(n) < 0.4).astype(int)
    a = y + rng.normal(0, 1.2, n)
    b = a + rng.normal(0, 0.3, n)
    indices = gate.bootstrap_indices(n, 1000, seed=2)
    paired = gate.auc_difference(y, a, b, indices)
    ia, ib = gate.auc_interval(y, a, indices), gate.auc_interval(y, b, indices)
    assert paired.low <= paired.estimate <= paired.high
    assert paired.high - paired.low < 0.5 * ((ia.high - ia.low) + (ib.high - ib.low)) / 2


def test_single_class_rows_are_refused_with_a_reason() -> None:
    y = np.zeros(50, dtype=int)
    with pytest.raises(ValueError, match="single class"):
        gate.decide(
            y, np.random.random(50), np.random.random(50), champion=None, oracle=None,
            min_lift=0.02, margin=0.01, oracle_margin=0.02, max_auc=0.9, resamples=100,
        )  # fmt: skip


# -- the gate on real boosters and the real registry ---------------------------------------------

SIGNAL = "session_product_views"  # the column that carries the behaviour
LEAK = "user_purchases"  # a column that, in the leaky data, is almost the label itself
ROWS, DAYS = 6000, 6


def gate_data(seed: int = 5) -> tuple[pl.DataFrame, np.ndarray]:
    """A training_set-shaped table: the label follows SIGNAL (the true probability is known,
    as for generated data), price and the other columns are noise, and LEAK is the label plus
    a little noise. Returns the table and the true probabilities."""
    rng = np.random.default_rng(seed)
    days = np.sort(rng.integers(1, DAYS + 1, ROWS))
    columns = {name: rng.normal(size=ROWS) for name in MODEL_FEATURES}
    probability = 1 / (1 + np.exp(-(2.0 * columns[SIGNAL] - 0.5)))
    label = (rng.random(ROWS) < probability).astype(int)
    columns[LEAK] = label + rng.normal(0, 0.2, ROWS)
    frame = pl.DataFrame(
        {
            "event_id": [f"g{i:06d}" for i in range(ROWS)],
            "event_time": [f"2024-03-0{d} 12:00:{i % 60:02d}" for i, d in enumerate(days)],
            "event_date": [f"2024-03-0{d}" for d in days],
            "split": ["test" if d == DAYS else "train" for d in days],
            LABEL: label,
            **columns,
        }
    ).with_columns(pl.col("event_time").str.to_datetime(), pl.col("event_date").str.to_date())
    return frame, probability


def booster_on(
    frame: pl.DataFrame, *, hide: tuple[str, ...] = (), rounds: int = 60
) -> xgboost.Booster:
    """A booster over MODEL_FEATURES trained on the train split, blind to `hide` (NaN)."""
    train = frame.filter(pl.col("split") == "train")
    x = train.select(
        (pl.lit(None, pl.Float64) if c in hide else pl.col(c).cast(pl.Float64)).alias(c)
        for c in MODEL_FEATURES
    ).to_numpy()
    data = xgboost.DMatrix(x, label=train[LABEL].to_numpy(), feature_names=list(MODEL_FEATURES))
    params = {"objective": "binary:logistic", "max_depth": 3, "eta": 0.1, "seed": 1}
    return xgboost.train(params, data, num_boost_round=rounds)


@pytest.fixture(scope="module")
def gate_settings(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    home = tmp_path_factory.mktemp("gate-home")
    warehouse = home / "warehouse.duckdb"
    frame, probability = gate_data()
    with duckdb.connect(str(warehouse)) as con:
        con.register("frame", frame.to_arrow())
        con.execute("create table training_set as select * from frame")
    settings = stack.model_copy(
        update={
            "home": Path(home),
            "warehouse_path": str(warehouse),
            "model_name": "test_gate_model",
            "gate_bootstrap": 400,
        }
    )
    recorder = truth.TruthRecorder()
    for event_id, p in zip(frame["event_id"].to_list(), probability.tolist(), strict=True):
        recorder(event_id, p, p)
    recorder.write(settings, "gate-test")
    return settings


def register(booster: xgboost.Booster, settings: Settings) -> str:
    return registry.log_and_register(booster, params={}, metrics={}, settings=settings).version


@pytest.mark.services
def test_gate_refusals_and_pass_on_the_same_rows(gate_settings: Settings) -> None:
    settings = gate_settings
    frame, _ = gate_data()

    # No champion yet: a model that learnt the signal (and not the leak) passes.
    honest = register(booster_on(frame, hide=(LEAK,)), settings)
    first = promotion.evaluate(settings, honest)
    assert first.decision.passed, first.decision.description
    assert first.champion_version is None and first.decision.ceiling_source == "oracle"
    assert first.test_rows == frame.filter(pl.col("split") == "test").height
    registry.promote(honest, settings)

    # Too weak: blind to the signal and the leak, it cannot beat the price-only baseline.
    weak = register(booster_on(frame, hide=(SIGNAL, LEAK)), settings)
    verdict = promotion.evaluate(settings, weak).decision
    assert not verdict.passed
    assert any(r.startswith("too weak") for r in verdict.reasons), verdict.reasons

    # Implausibly good: it learnt the leak and beats the true probabilities themselves.
    leaky = register(booster_on(frame), settings)
    verdict = promotion.evaluate(settings, leaky).decision
    assert any(r.startswith("implausibly good") for r in verdict.reasons), verdict.reasons
    assert verdict.oracle_auc is not None and verdict.challenger_auc.estimate > verdict.oracle_auc

    # Worse than the champion: it learnt the signal, but a single tree of depth 3 ranks
    # coarsely; on the same rows the champion is measurably better.
    coarse = register(booster_on(frame, hide=(LEAK,), rounds=1), settings)
    evaluation = promotion.evaluate(settings, coarse)
    verdict = evaluation.decision
    assert evaluation.champion_version == honest
    assert verdict.vs_champion is not None and verdict.vs_champion.high < 0
    assert [r for r in verdict.reasons if r.startswith("worse than the champion")], verdict.reasons
    assert not any(r.startswith("too weak") for r in verdict.reasons), verdict.reasons

    # The same model as the champion, retrained: not worse, so it may be promoted.
    again = register(booster_on(frame, hide=(LEAK,)), settings)
    verdict = promotion.evaluate(settings, again).decision
    assert verdict.passed, verdict.description
    assert verdict.vs_champion is not None and verdict.vs_champion.estimate == 0.0
