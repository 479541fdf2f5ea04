"""Online/offline parity through the real path: carts of the training set, posted to the running
`/predict` as a live client would send them (ids, price and the cart's `event_time` and
`event_id`), must come back with the training row's features and the registered model's offline
prediction of that row.

It holds only where serving sees what the training row saw: the online store materialized as of
the carts' day D (`online_features` with `as_of` = D: user and product history of the days
before D) and the carts' sessions streamed into Redis (`easymlops.session_features`, later events
included: serving must ignore them). Rows of other days are not comparable and are not sampled.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import UTC, date
from typing import Any

import httpx
import numpy as np
import polars as pl
import redis

from easymlops import warehouse
from easymlops.features import MODEL_FEATURES, session_key
from easymlops.settings import Settings

# Counts must match exactly and floats to rounding (the warehouse's doubles and Redis' repr()
# of them are the same numbers); a probability to what float32 trees can differ by.
FEATURE_TOLERANCE = 1e-9
PROBABILITY_TOLERANCE = 1e-6


@dataclass
class ParityReport:
    day: date
    rows: int = 0  # carts compared
    skipped_unstreamed: int = 0  # carts whose session is not in Redis (expired or never streamed)
    features_compared: bool = False  # serving reported its feature values (debug setting on)
    model_version: str = ""
    max_probability_difference: float = 0.0
    mismatches: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return self.rows > 0 and not self.mismatches


def sample_carts(settings: Settings, day: date, n: int) -> pl.DataFrame:
    """Up to `n` carts of the training set on `day`, spread over the day (every k-th by time)."""
    frame = warehouse.query_frame(
        settings,
        "select event_id, event_time, user_id, product_id, user_session, "
        f"{', '.join(MODEL_FEATURES)} from training_set where event_date = ? "
        "order by event_time, event_id",
        [day],
    )
    step = max(1, frame.height // n)
    return frame.gather_every(step).head(n)


def request_body(row: dict[str, Any]) -> dict[str, Any]:
    """What a client posts for this cart: ids, price, and the cart's own time and id."""
    moment = row["event_time"]
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return {
        "user_id": row["user_id"],
        "product_id": row["product_id"],
        "user_session": row["user_session"],
        "price": row["price"],
        "event_time": moment.isoformat(),
        "event_id": row["event_id"],
    }


def _same(served: float | None, offline: float | None) -> bool:
    if served is None or offline is None or (isinstance(offline, float) and math.isnan(offline)):
        return served is None and (offline is None or math.isnan(offline))
    return abs(served - offline) <= FEATURE_TOLERANCE * max(1.0, abs(offline))


def compare(settings: Settings, day: date, *, sample: int = 50) -> ParityReport:
    """Post a sample of `day`'s carts to the served model and compare with the offline row and
    prediction (module docstring). The model is the version that answered."""
    from easymlops import registry, training

    report = ParityReport(day=day)
    carts = sample_carts(settings, day, sample)
    client = redis.Redis.from_url(settings.redis)
    streamed = [bool(client.exists(session_key(s))) for s in carts["user_session"].to_list()]
    report.skipped_unstreamed = streamed.count(False)
    carts = carts.filter(pl.Series(streamed, dtype=pl.Boolean))
    if carts.is_empty():
        return report
    rows = carts.to_dicts()
    response = httpx.post(
        f"{settings.serve_url}/predict/batch",
        json={"requests": [request_body(row) for row in rows]},
        timeout=60,
        headers=settings.serve_headers,
    )
    if response.status_code != 200:
        report.mismatches.append(f"/predict/batch answered {response.status_code}: {response.text}")
        return report
    predictions = response.json()["predictions"]
    versions = {p["model_version"] for p in predictions}
    if len(versions) != 1:
        report.mismatches.append(f"versions changed during the batch: {sorted(versions)}")
        return report
    report.model_version = versions.pop()
    uri = f"models:/{settings.model_name}/{report.model_version}"
    booster = registry.load_booster(uri, settings)
    offline = training.predict(booster, carts)
    report.rows = len(rows)
    report.features_compared = all(p.get("features") is not None for p in predictions)
    differences = []
    for row, served, expected in zip(rows, predictions, offline.tolist(), strict=True):
        difference = abs(served["probability"] - expected)
        differences.append(difference)
        if difference > PROBABILITY_TOLERANCE:
            report.mismatches.append(
                f"cart {row['event_id']}: served {served['probability']:.8f}, offline "
                f"{expected:.8f}"
            )
        for name, value in (served.get("features") or {}).items():
            if not _same(value, row[name]):
                report.mismatches.append(
                    f"cart {row['event_id']} {name}: served {value}, training row {row[name]}"
                )
    report.max_probability_difference = float(np.max(differences))
    return report
