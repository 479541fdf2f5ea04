"""Live performance: logged predictions (bronze_predictions) joined with the labels realized
later, once they are mature (dbt training_set keeps only carts whose session is over)."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

import polars as pl
from deltalake import DeltaTable

from easymlops import lake, training, warehouse
from easymlops.settings import Settings


@dataclass
class VersionPerformance:
    model_version: str
    predictions: int  # logged predictions of the day for this version
    labelled: int  # of which have a mature label
    metrics: dict[str, float] = field(default_factory=dict)  # test_* keys of training.evaluate
    calibration: list[dict] = field(default_factory=list)


def logged_predictions(settings: Settings, day: date) -> pl.DataFrame:
    """The day's logged predictions of carts (with an event id), the first per cart and version
    (a retried request is one prediction)."""
    path = lake.bronze_path(settings, "predictions")
    if not DeltaTable.is_deltatable(path):
        return pl.DataFrame(schema=lake.PREDICTION_COLUMNS)
    return (
        pl.read_delta(path)
        .filter(pl.col("event_id").is_not_null() & (pl.col("scored_at").dt.date() == day))
        .sort("predicted_at")
        .unique(subset=["event_id", "model_version"], keep="first", maintain_order=True)
    )


# Ids per query: one `in (?, ...)` list, the same SQL on DuckDB and PostgreSQL (DuckDB's
# `unnest(?)` of a list parameter has no PostgreSQL equivalent through the shared reader).
_IDS_PER_QUERY = 1000


def mature_labels(settings: Settings, event_ids: list[str]) -> pl.DataFrame:
    frames = []
    with warehouse.reader(settings) as r:
        for start in range(0, len(event_ids), _IDS_PER_QUERY):
            chunk = event_ids[start : start + _IDS_PER_QUERY]
            frames.append(
                r.frame(
                    "select event_id, label from training_set "
                    f"where event_id in ({', '.join('?' * len(chunk))})",
                    chunk,
                )
            )
    if not frames:
        return pl.DataFrame(schema={"event_id": pl.String(), "label": pl.Boolean()})
    return pl.concat(frames)


def performance(settings: Settings, day: date) -> list[VersionPerformance]:
    """Per model version: AUC (with its bootstrap interval), logloss, Brier score, PR-AUC and a
    calibration table of the day's predictions whose label is known."""
    predictions = logged_predictions(settings, day)
    if predictions.is_empty():
        return []
    labels = mature_labels(settings, predictions["event_id"].unique().to_list())
    joined = predictions.join(labels, on="event_id", how="left")
    results = []
    for (version,), rows in joined.group_by("model_version", maintain_order=True):
        labelled = rows.filter(pl.col("label").is_not_null())
        result = VersionPerformance(
            model_version=str(version), predictions=rows.height, labelled=labelled.height
        )
        y = labelled["label"].cast(pl.Int8).to_numpy()
        scores = labelled["probability"].to_numpy()
        if labelled.height and 0 < y.sum() < len(y):  # AUC needs both outcomes
            result.metrics = training.evaluate(
                y, scores, resamples=settings.gate_bootstrap, seed=settings.tune_seed
            )
            result.calibration = training.calibration_table(y, scores)
        results.append(result)
    return results
