"""Batch scoring of a day's cart events with serving's own feature code.

A cart is scored exactly as `/predict` would score it with the online store materialized as of
its day and its session fully streamed: user and product hashes built as `online_features`
writes them (`online_store.entity_hash` of the rows valid on the day), the session hash as the
stream writes it (`session_features.field_of` of the session's silver events), then
`serving.features.assemble_row` / `session_features` and `LoadedModel.predict`, the functions the
replica calls. Requests carry the cart's event_time and event_id, so only events strictly before
the cart count.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl

from easymlops import features, lake, online_store, registry, warehouse
from easymlops.session_features import field_of
from easymlops.settings import Settings
from serving.features import assemble_row, feature_values, session_features, to_matrix
from serving.model import LoadedModel

SCORE_COLUMNS: dict[str, pl.DataType] = {
    "event_id": pl.String(),
    "event_time": pl.Datetime("us"),
    "event_date": pl.Date(),
    "user_id": pl.Int64(),
    "product_id": pl.Int64(),
    "user_session": pl.String(),
    "model_name": pl.String(),
    "model_version": pl.String(),
    "probability": pl.Float64(),
    "missing_features": pl.Int32(),
    # The feature values the model was given (null where missing): what drift is measured on.
    **{name: pl.Float64() for name in features.MODEL_FEATURES},
}


def load_champion(settings: Settings) -> LoadedModel:
    info = registry.champion(settings)
    if info is None:
        raise RuntimeError(f"{settings.model_name} has no {settings.champion_alias} to score with")
    booster = registry.load_booster(info.model_uri, settings)
    return LoadedModel(info=info, booster=booster, loaded_at=datetime.now(UTC))


def _hashes(settings: Settings, table: str, key: str, names: tuple[str, ...], day: date) -> dict:
    return {
        row[0]: online_store.entity_hash(names, row[1:-1])
        for row in online_store.rows_as_of(settings, table, key, names, day)
    }


def score_day(settings: Settings, day: date, model: LoadedModel) -> pl.DataFrame:
    """Every cart event of `day` in silver with the model's probability."""
    # A session may have begun the day before: its earlier events count for the cart.
    events = lake.read_silver(settings, day - timedelta(days=1), day + timedelta(days=1))
    carts = events.filter(
        (pl.col("event_type") == "cart") & (pl.col("event_time").dt.date() == day)
    ).sort("event_time", "event_id")
    if carts.is_empty():
        return pl.DataFrame(schema=SCORE_COLUMNS)
    sessions: dict[str, dict[str, str]] = {}
    for event_id, event_time, event_type, product_id, session in (
        events.filter(pl.col("user_session").is_in(carts["user_session"].unique().implode()))
        .select("event_id", "event_time", "event_type", "product_id", "user_session")
        .iter_rows()
    ):
        name, value = field_of(event_id, event_time, event_type, product_id)
        sessions.setdefault(session, {})[name] = value
    users = _hashes(settings, "user_features", "user_id", features.USER_FEATURES, day)
    products = _hashes(settings, "product_features", "product_id", features.PRODUCT_FEATURES, day)
    rows = [
        assemble_row(
            {"price": cart["price"]},
            users.get(cart["user_id"], {}),
            products.get(cart["product_id"], {}),
            session_features(
                sessions.get(cart["user_session"], {}),
                cart["product_id"],
                cart["event_time"].replace(tzinfo=UTC),
                cart["event_id"],
            ),
        )
        for cart in carts.iter_rows(named=True)
    ]
    probabilities = model.predict(to_matrix(rows))
    values = [feature_values(row) for row in rows]
    return pl.DataFrame(
        {
            "event_id": carts["event_id"],
            "event_time": carts["event_time"],
            "event_date": carts["event_time"].dt.date(),
            "user_id": carts["user_id"],
            "product_id": carts["product_id"],
            "user_session": carts["user_session"],
            "model_name": model.info.name,
            "model_version": model.info.version,
            "probability": probabilities.astype(float),
            "missing_features": [len(row.missing) for row in rows],
            **{name: [v[name] for v in values] for name in features.MODEL_FEATURES},
        },
        schema=SCORE_COLUMNS,
    )


def scores_path(settings: Settings, day: date) -> str:
    return f"{settings.lake}/gold/cart_scores/event_date={day.isoformat()}/scores.parquet"


def write_scores(settings: Settings, day: date, scores: pl.DataFrame) -> None:
    """Replace the day's scores in the lake (one Parquet file per date) and in the warehouse
    table `cart_scores`, on either backend (a rerun of a date rewrites it, never appends twice)."""
    path = scores_path(settings, day)
    if not path.startswith("s3://"):
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
    scores.write_parquet(path)
    warehouse.replace_date(settings, "cart_scores", day, scores)
