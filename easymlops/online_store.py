"""Materialize the latest user and product features from the warehouse into Redis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime

import redis
from redis.typing import EncodableT, FieldT

from easymlops import features
from easymlops.settings import Settings
from easymlops.warehouse import connect

# The row per entity valid on day `as_of` (today): the one with the greatest valid_from <= as_of.
# Exactly what the training set joins for an event on that day, so history is only ever from
# days strictly before it, online as offline; a row built from today's own partial activity
# (valid_from tomorrow) is not served, since no training row ever saw same-day history.
AS_OF_SQL = """
select {key}, {columns}, valid_from from {table}
where valid_from <= $as_of and (valid_to is null or valid_to > $as_of)
"""


@dataclass
class OnlineMaterialization:
    users: int
    products: int
    as_of: str


def rows_as_of(
    settings: Settings, table: str, key: str, columns: tuple[str, ...], as_of: date
) -> list[tuple]:
    with connect(settings) as con:
        sql = AS_OF_SQL.format(key=key, columns=", ".join(columns), table=table)
        return con.execute(sql, {"as_of": as_of}).fetchall()


def _write(pipe: redis.client.Pipeline, key: str, names: tuple[str, ...], values: tuple) -> None:
    mapping: dict[FieldT, EncodableT] = {
        name: repr(float(value))
        for name, value in zip(names, values, strict=True)
        if value is not None and math.isfinite(float(value))
    }
    pipe.delete(key)
    if mapping:
        pipe.hset(key, mapping=mapping)


def materialize(
    settings: Settings, *, as_of: date | None = None, batch: int = 5000
) -> OnlineMaterialization:
    """Write every user's and product's features valid on `as_of` (default: today, UTC);
    returns counts for metadata."""
    client = redis.Redis.from_url(settings.redis)
    day = as_of or datetime.now(UTC).date()
    users = rows_as_of(settings, "user_features", "user_id", features.USER_FEATURES, day)
    products = rows_as_of(
        settings, "product_features", "product_id", features.PRODUCT_FEATURES, day
    )
    newest = max((row[-1] for row in users + products), default=None)
    # MULTI/EXEC per batch: serving never sees a key between its delete and its rewrite.
    pipe = client.pipeline(transaction=True)
    for i, row in enumerate(users, 1):
        _write(pipe, features.user_key(row[0]), features.USER_FEATURES, row[1:-1])
        if i % batch == 0:
            pipe.execute()
    for i, row in enumerate(products, 1):
        _write(pipe, features.product_key(row[0]), features.PRODUCT_FEATURES, row[1:-1])
        if i % batch == 0:
            pipe.execute()
    pipe.hset(
        features.META_KEY,
        mapping={
            "feature_set_version": features.FEATURE_SET_VERSION,
            "materialized_at": datetime.now(UTC).isoformat(),
            "as_of": str(day),
            "newest_valid_from": str(newest),
            "users": len(users),
            "products": len(products),
        },
    )
    pipe.execute()
    return OnlineMaterialization(users=len(users), products=len(products), as_of=str(day))


def materialized_as_of(settings: Settings) -> date | None:
    """The `as_of` day of the last materialization (from `feat:meta`), if any."""
    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    value = client.hget(features.META_KEY, "as_of")
    return date.fromisoformat(str(value)) if value else None


def read_entity(settings: Settings, key: str) -> dict[str, float]:
    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    return {str(k): float(v) for k, v in client.hgetall(key).items()}
