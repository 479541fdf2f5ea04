"""Drift statistics on the generator's carts: fresh data from the same generator is stable,
a planted shift is found and named."""

from __future__ import annotations

import math
from datetime import date, datetime

import numpy as np
import polars as pl
import pytest

from easymlops import drift
from easymlops.features import REQUEST_FEATURES, SESSION_FEATURES
from easymlops.generator import generate_events
from easymlops.session_features import features_at, field_of

COLUMNS = (*REQUEST_FEATURES, *SESSION_FEATURES)


def cart_features(seed: int, n: int = 30_000) -> pl.DataFrame:
    """Price and the session features serving computes, for every cart of `n` events."""
    sessions: dict[str, dict[str, str]] = {}
    rows = []
    for event in generate_events(n, days=3, seed=seed, start=date(2026, 11, 1)):
        moment = datetime.fromisoformat(event["event_time"].replace("Z", "+00:00"))
        fields = sessions.setdefault(event["user_session"], {})
        if event["event_type"] == "cart":
            row = features_at(fields, event["product_id"], moment, event["event_id"])
            rows.append({"price": event["price"], **row})
        name, value = field_of(event["event_id"], moment, event["event_type"], event["product_id"])
        fields[name] = value
    return pl.DataFrame(rows)


@pytest.fixture(scope="module")
def reference() -> pl.DataFrame:
    return cart_features(seed=1)


def test_fresh_data_from_the_same_generator_does_not_drift(reference: pl.DataFrame) -> None:
    fresh = cart_features(seed=2)
    drifts = drift.compare(reference, fresh, COLUMNS)
    assert {d.name for d in drifts} == set(COLUMNS)
    assert max(d.psi for d in drifts) < 0.1, drift.markdown_table(drifts, 0.1, 0.25)


def test_prices_times_three_drift_and_are_named(reference: pl.DataFrame) -> None:
    shifted = cart_features(seed=2).with_columns(pl.col("price") * 3)
    drifts = drift.compare(reference, shifted, COLUMNS)
    assert drifts[0].name == "price" and drifts[0].psi > 0.25
    assert drifts[0].ks is not None and drifts[0].ks > 0.2 and drifts[0].ks_pvalue < 1e-6
    assert all(d.psi < 0.1 for d in drifts[1:])  # only price moved
    table = drift.markdown_table(drifts, 0.1, 0.25)
    assert "| price **FAIL** |" in table


def test_a_feature_going_missing_is_drift() -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=5000)
    half_missing = values.copy()
    half_missing[::2] = math.nan
    assert drift.psi(values, values) == pytest.approx(0.0, abs=1e-12)
    assert drift.psi(values, half_missing) > 0.25
    # Discrete counts: no KS, PSI over their values.
    counts = pl.DataFrame({"n": rng.poisson(2, 5000)})
    (result,) = drift.compare(counts, counts.with_columns(pl.col("n") + 3), ["n"])
    assert result.ks is None and result.psi > 0.25
