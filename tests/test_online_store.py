"""The online store serves the feature row the training set would join today: history of the
days strictly before today, never a row built from today's own activity."""

from __future__ import annotations

from datetime import date, timedelta
from pathlib import Path

import duckdb
import pytest
import redis

from easymlops import features, online_store
from easymlops.settings import Settings

pytestmark = pytest.mark.services

TODAY = date(2024, 3, 10)


def feature_table(con: duckdb.DuckDBPyConnection, table: str, key: str, names: tuple[str, ...]):
    columns = ", ".join(f"{n} double" for n in names)
    con.execute(f"create table {table} ({key} bigint, valid_from date, valid_to date, {columns})")

    def row(entity: int, valid_from: date, valid_to: date | None, value: float) -> None:
        con.execute(
            f"insert into {table} values (?, ?, ?, {', '.join('?' for _ in names)})",
            [entity, valid_from, valid_to, *[value] * len(names)],
        )

    return row


def test_materializes_the_rows_valid_today(stack: Settings, tmp_path: Path) -> None:
    settings = stack.model_copy(update={"warehouse_path": str(tmp_path / "w.duckdb")})
    con = duckdb.connect(str(settings.warehouse))
    user = feature_table(con, "user_features", "user_id", features.USER_FEATURES)
    product = feature_table(con, "product_features", "product_id", features.PRODUCT_FEATURES)
    day = timedelta(days=1)
    # user 901: history up to yesterday (valid from today) -> served
    user(901, TODAY - 5 * day, TODAY, 1.0)
    user(901, TODAY, None, 2.0)
    # user 902: a row from yesterday's history, and one from today's own activity -> the former
    user(902, TODAY - 2 * day, TODAY + day, 3.0)
    user(902, TODAY + day, None, 4.0)
    # user 903: active only today -> nothing to serve yet (training would see no history either)
    user(903, TODAY + day, None, 5.0)
    product(77, TODAY - 3 * day, None, 6.0)
    con.close()

    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    client.delete(*(features.user_key(u) for u in (901, 902, 903)), features.product_key(77))

    result = online_store.materialize(settings, as_of=TODAY)
    assert (result.users, result.products, result.as_of) == (2, 1, str(TODAY))
    first = features.USER_FEATURES[0]
    assert online_store.read_entity(settings, features.user_key(901))[first] == 2.0
    assert online_store.read_entity(settings, features.user_key(902))[first] == 3.0
    assert online_store.read_entity(settings, features.user_key(903)) == {}
    product_row = online_store.read_entity(settings, features.product_key(77))
    assert product_row[features.PRODUCT_FEATURES[0]] == 6.0
    assert online_store.materialized_as_of(settings) == TODAY
