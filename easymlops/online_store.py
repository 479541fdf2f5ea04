"""Materialize the latest user and product features from the warehouse into Redis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from redis.typing import EncodableT, FieldT

from easymlops import features
from easymlops.settings import Settings
from easymlops.warehouse import connect

# The latest row per entity (the open-ended one, valid_to is null): features are cumulative,
# so it holds everything known up to now, which is what serving should see "today".
LATEST_SQL = "select {key}, {columns}, valid_from from {table} where valid_to is null"


@dataclass
class OnlineMaterialization:
    users: int
    products: int
    as_of: str


def _latest(settings: Settings, table: str, key: str, columns: tuple[str, ...]) -> list[tuple]:
    with connect(settings) as con:
        sql = LATEST_SQL.format(key=key, columns=", ".join(columns), table=table)
        return con.execute(sql).fetchall()


def _write(pipe: redis.client.Pipeline, key: str, names: tuple[str, ...], values: tuple) -> None:
    mapping: dict[FieldT, EncodableT] = {
        name: repr(float(value))
        for name, value in zip(names, values, strict=True)
        if value is not None and math.isfinite(float(value))
    }
    pipe.delete(key)
    if mapping:
        pipe.hset(key, mapping=mapping)


def materialize(settings: Settings, *, batch: int = 5000) -> OnlineMaterialization:
    """Write every user's and product's latest features; returns counts for metadata."""
    client = redis.Redis.from_url(settings.redis)
    users = _latest(settings, "user_features", "user_id", features.USER_FEATURES)
    products = _latest(settings, "product_features", "product_id", features.PRODUCT_FEATURES)
    as_of = max((row[-1] for row in users + products), default=None)
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
            "as_of": str(as_of),
            "users": len(users),
            "products": len(products),
        },
    )
    pipe.execute()
    return OnlineMaterialization(users=len(users), products=len(products), as_of=str(as_of))


def read_entity(settings: Settings, key: str) -> dict[str, float]:
    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    return {str(k): float(v) for k, v in client.hgetall(key).items()}
