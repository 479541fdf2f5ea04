"""Materialize the latest user and product features from the warehouse into Redis."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from easymlops import features, warehouse
from easymlops.settings import Settings

# redis is imported by the functions that connect: the Dagster definitions import this module.
if TYPE_CHECKING:
    import redis
    from redis.typing import EncodableT, FieldT

# The row per entity valid on day `as_of` (today): the one with the greatest valid_from <= as_of.
# Exactly what the training set joins for an event on that day, so history is only ever from
# days strictly before it, online as offline; a row built from today's own partial activity
# (valid_from tomorrow) is not served, since no training row ever saw same-day history.
AS_OF_SQL = """
select {key}, {columns}, valid_from from {table}
where valid_from <= ? and (valid_to is null or valid_to > ?)
"""


@dataclass
class OnlineMaterialization:
    users: int
    products: int
    as_of: str


def rows_as_of(
    settings: Settings, table: str, key: str, columns: tuple[str, ...], as_of: date
) -> list[tuple]:
    sql = AS_OF_SQL.format(key=key, columns=", ".join(columns), table=table)
    return warehouse.query(settings, sql, [as_of, as_of])


def entity_hash(names: tuple[str, ...], values: tuple) -> dict[str, str]:
    """The Redis hash of one user or product: each present, finite feature as repr(float), a
    missing one left out (serving reads it as missing). Batch scoring builds the same hashes."""
    return {
        name: repr(float(value))
        for name, value in zip(names, values, strict=True)
        if value is not None and math.isfinite(float(value))
    }


def _write(pipe: redis.client.Pipeline, key: str, names: tuple[str, ...], values: tuple) -> None:
    mapping: dict[FieldT, EncodableT] = {k: v for k, v in entity_hash(names, values).items()}
    pipe.delete(key)
    if mapping:
        pipe.hset(key, mapping=mapping)


def materialize(
    settings: Settings, *, as_of: date | None = None, batch: int = 5000
) -> OnlineMaterialization:
    """Write every user's and product's features valid on `as_of` (default: today, UTC);
    returns counts for metadata."""
    import redis

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
    pipe.execute()
    # Entities with no row valid on `day` (first seen on or after it) must have no features:
    # drop what an earlier materialization (e.g. as of a later day) left for them.
    written = {features.user_key(row[0]) for row in users}
    written |= {features.product_key(row[0]) for row in products}
    for pattern in (features.user_key("*"), features.product_key("*")):  # type: ignore[arg-type]
        stale = [
            k for k in client.scan_iter(match=pattern, count=5000) if k.decode() not in written
        ]
        for lo in range(0, len(stale), batch):
            pipe.delete(*stale[lo : lo + batch])
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
    import redis

    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    value = client.hget(features.META_KEY, "as_of")
    return date.fromisoformat(str(value)) if value else None


def read_entity(settings: Settings, key: str) -> dict[str, float]:
    import redis

    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    return {str(k): float(v) for k, v in client.hgetall(key).items()}


def compare_with_warehouse(settings: Settings, as_of: date) -> tuple[str, int, int, list[str]]:
    """Every user and product hash in Redis against the features the warehouse gives that
    entity on `as_of`: the training set's point-in-time join where it has carts of that day,
    else the as-of query. A null (or missing) feature must be absent in Redis. Returns the
    source compared with, users and products compared, and the mismatches."""
    with warehouse.reader(settings) as con:
        carts = con.rows("select count(*) from training_set where event_date = ?", [as_of])
        from_training_set = bool(carts and carts[0][0])
        expected: list[tuple[str, tuple[str, ...], list[tuple]]] = []
        for kind, key, names, table in (
            ("user", "user_id", features.USER_FEATURES, "user_features"),
            ("product", "product_id", features.PRODUCT_FEATURES, "product_features"),
        ):
            if from_training_set:
                rows = con.rows(
                    f"select distinct {key}, {', '.join(names)} from training_set "
                    "where event_date = ?",
                    [as_of],
                )
            else:
                sql = AS_OF_SQL.format(key=key, columns=", ".join(names), table=table)
                rows = [r[:-1] for r in con.rows(sql, [as_of, as_of])]
            expected.append((kind, names, rows))
    import redis

    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    mismatches: list[str] = []
    counts = []
    for kind, names, rows in expected:
        key_of = features.user_key if kind == "user" else features.product_key
        pipe = client.pipeline(transaction=False)
        for row in rows:
            pipe.hgetall(key_of(row[0]))
        stored = pipe.execute()
        counts.append(len(rows))
        for row, online in zip(rows, stored, strict=True):
            for name, value in zip(names, row[1:], strict=True):
                known = value is not None and math.isfinite(float(value))
                if not known:
                    if name in online:
                        mismatches.append(f"{kind} {row[0]} {name}: redis {online[name]}, null")
                elif name not in online:
                    mismatches.append(f"{kind} {row[0]} {name}: missing in redis, {value}")
                elif abs(float(online[name]) - float(value)) > 1e-9 * max(1.0, abs(value)):
                    mismatches.append(f"{kind} {row[0]} {name}: redis {online[name]}, {value}")
    source = "training_set join" if from_training_set else "as-of query"
    return source, counts[0], counts[1], mismatches
