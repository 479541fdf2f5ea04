"""The dbt project for real: a hand-crafted silver lake -> `dbt build` on DuckDB -> exact labels,
session features, sessions / users / products marts, point-in-time user/product features, split,
and the dbt tests themselves.

Timeline of the dataset (three days, three users; e<NN> are event ids):

day 1  s0 user 3   e00 view 104 @23:59:50 (the session runs past midnight: e00b on day 2)
       s1 user 1   e01 view 101, e02 view 102, e03 view 101, e04 cart 101, e05 purchase 101
                   -> e04 label 1
       s2 user 2   e06 view 103, e07 cart 103, e08 view 104, e09 purchase 104
                   -> e07 label 0 (the purchase is of another product)
day 2  s0 user 3   e00b view 101 @00:00:05
       s3 user 1   e10 view 102, e11 cart 102, e12 remove_from_cart 102
       s4 user 1   e13 purchase 102     -> e11 label 0 (purchase in another session)
       s5 user 3   e14 view 101, e15 cart 101, e16 purchase 101 at the same
                   instant as e15       -> e15 label 1 (tie rule: purchase sorts after cart)
day 3  s6 user 2   e17 view 103, e18 cart 103, e19 purchase 103 -> e18 label 1
       s7 user 1   e20 cart 104 (first event of its session) -> e20 label 0
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from datetime import date, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl
import pytest

from easymlops.features import LABEL, MODEL_FEATURES

ROOT = Path(__file__).resolve().parents[1]
PROJECT_DIR = ROOT / "dbt_project"
DBT = Path(sys.executable).parent / "dbt"  # the CLI of this virtualenv, run as Dagster does
D1, D2, D3 = date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)

PRODUCTS = {  # product_id: (category_id, category_code, brand)
    101: (10, "electronics.smartphone", "acme"),
    102: (10, "electronics.smartphone", None),
    103: (20, "appliances.kitchen.washer", "wash"),
    104: (20, None, None),
}

# (event_id, event_time, event_type, product_id, price, user_id, user_session)
EVENTS: list[tuple[str, str, str, int, float, int, str]] = [
    ("e00", "2024-03-01 23:59:50", "view", 104, 70.0, 3, "s0"),
    ("e01", "2024-03-01 10:00:00", "view", 101, 100.0, 1, "s1"),
    ("e02", "2024-03-01 10:00:30", "view", 102, 200.0, 1, "s1"),
    ("e03", "2024-03-01 10:01:00", "view", 101, 100.0, 1, "s1"),
    ("e04", "2024-03-01 10:02:00", "cart", 101, 100.0, 1, "s1"),
    ("e05", "2024-03-01 10:05:00", "purchase", 101, 100.0, 1, "s1"),
    ("e06", "2024-03-01 11:00:00", "view", 103, 50.0, 2, "s2"),
    ("e07", "2024-03-01 11:01:00", "cart", 103, 50.0, 2, "s2"),
    ("e08", "2024-03-01 11:02:00", "view", 104, 70.0, 2, "s2"),
    ("e09", "2024-03-01 11:03:00", "purchase", 104, 70.0, 2, "s2"),
    ("e00b", "2024-03-02 00:00:05", "view", 101, 100.0, 3, "s0"),
    ("e10", "2024-03-02 09:00:00", "view", 102, 210.0, 1, "s3"),
    ("e11", "2024-03-02 09:01:00", "cart", 102, 210.0, 1, "s3"),
    ("e12", "2024-03-02 09:02:00", "remove_from_cart", 102, 210.0, 1, "s3"),
    ("e13", "2024-03-02 15:00:00", "purchase", 102, 210.0, 1, "s4"),
    ("e14", "2024-03-02 12:00:00", "view", 101, 100.0, 3, "s5"),
    ("e15", "2024-03-02 12:00:10", "cart", 101, 100.0, 3, "s5"),
    ("e16", "2024-03-02 12:00:10", "purchase", 101, 100.0, 3, "s5"),
    ("e17", "2024-03-03 08:00:00", "view", 103, 50.0, 2, "s6"),
    ("e18", "2024-03-03 08:00:20", "cart", 103, 50.0, 2, "s6"),
    ("e19", "2024-03-03 08:05:00", "purchase", 103, 50.0, 2, "s6"),
    ("e20", "2024-03-03 10:00:00", "cart", 104, 70.0, 1, "s7"),
]

EXPECTED_LABELS = {"e04": 1, "e07": 0, "e11": 0, "e15": 1, "e18": 1, "e20": 0}
# Session timeout 0: every session counts as over, so e20 (the last event of the data) is in
# training_set; label maturity with a real timeout is tested on its own below.
VARS = {"holdout_days": 1, "session_timeout_seconds": 0}


def silver_frame(rows: list[tuple[str, str, str, int, float, int, str]]) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "event_id": [r[0] for r in rows],
            "event_time": [datetime.fromisoformat(r[1]) for r in rows],
            "event_type": [r[2] for r in rows],
            "product_id": [r[3] for r in rows],
            "category_id": [PRODUCTS[r[3]][0] for r in rows],
            "category_code": [PRODUCTS[r[3]][1] for r in rows],
            "brand": [PRODUCTS[r[3]][2] for r in rows],
            "price": [r[4] for r in rows],
            "user_id": [r[5] for r in rows],
            "user_session": [r[6] for r in rows],
        },
        schema={
            "event_id": pl.String,
            "event_time": pl.Datetime("us"),
            "event_type": pl.String,
            "product_id": pl.Int64,
            "category_id": pl.Int64,
            "category_code": pl.String,
            "brand": pl.String,
            "price": pl.Float64,
            "user_id": pl.Int64,
            "user_session": pl.String,
        },
    )


def write_silver(lake: Path) -> None:
    """The silver layout: silver/events/event_date=YYYY-MM-DD/*.parquet, no event_date column
    inside the files (it comes from the hive partition)."""
    frame = silver_frame(EVENTS)
    for (day,), part in frame.group_by(pl.col("event_time").dt.date(), maintain_order=True):
        directory = lake / "silver" / "events" / f"event_date={day}"
        directory.mkdir(parents=True, exist_ok=True)
        part.sort("event_time").write_parquet(directory / "part-0.parquet")


@dataclass
class Build:
    env: dict[str, str]
    workdir: Path
    warehouse: Path
    results: list[dict[str, Any]]
    seconds: float


def run_dbt(
    args: list[str], env: dict[str, str], workdir: Path, project_dir: Path = PROJECT_DIR
) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """Run the dbt CLI as Dagster does (a subprocess); artifacts and logs go to `workdir` so
    the repository's dbt_project/target is untouched."""
    target_path = workdir / "target"
    command = [
        str(DBT),
        *args,
        "--project-dir",
        str(project_dir),
        "--profiles-dir",
        str(project_dir),
        "--target-path",
        str(target_path),
        "--log-path",
        str(workdir / "logs"),
    ]
    proc = subprocess.run(
        command, env=env, cwd=workdir, capture_output=True, text=True, timeout=600
    )
    run_results = target_path / "run_results.json"
    results = json.loads(run_results.read_text())["results"] if run_results.exists() else []
    return proc, results


def dbt_env(lake: Path, warehouse: Path, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASYMLOPS_", "DBT_"))}
    env.update(
        EASYMLOPS_LAKE_ROOT=str(lake),
        EASYMLOPS_WAREHOUSE_PATH=str(warehouse),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        DBT_VERSION_CHECK="false",
    )
    return env


@pytest.fixture(scope="module")
def build(tmp_path_factory: pytest.TempPathFactory) -> Build:
    base = tmp_path_factory.mktemp("dbt")
    lake, warehouse, workdir = base / "lake", base / "warehouse.duckdb", base / "work"
    workdir.mkdir()
    write_silver(lake)
    env = dbt_env(lake, warehouse, workdir)
    started = datetime.now()
    proc, results = run_dbt(["build", "--vars", json.dumps(VARS)], env, workdir)
    seconds = (datetime.now() - started).total_seconds()
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    print(f"dbt build took {seconds:.1f} s")
    return Build(env, workdir, warehouse, results, seconds)


def query(warehouse: Path, sql: str) -> list[dict[str, Any]]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        cursor = con.execute(sql)
        names = [d[0] for d in cursor.description]
        return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]


def training_rows(warehouse: Path) -> dict[str, dict[str, Any]]:
    return {r["event_id"]: r for r in query(warehouse, "select * from main.training_set")}


def test_all_models_built_and_dbt_tests_passed(build: Build) -> None:
    by_type: dict[str, list[dict[str, Any]]] = {}
    for result in build.results:
        by_type.setdefault(result["unique_id"].split(".")[0], []).append(result)
    models = {r["unique_id"].split(".")[-1] for r in by_type["model"]}
    assert models == {
        "stg_events",
        "int_sessions",
        "fct_sessions",
        "dim_users",
        "dim_products",
        "fct_cart_events",
        "user_features",
        "product_features",
        "training_set",
    }
    tests = by_type["test"]
    assert {r["status"] for r in tests} == {"pass"}, [
        (r["unique_id"], r["status"], r.get("message")) for r in tests if r["status"] != "pass"
    ]
    names = {r["unique_id"] for r in tests}
    assert "test.easymlops.assert_point_in_time" in names
    assert any("unique_combination_of_columns_user_features" in n for n in names)
    assert any("accepted_values_training_set_split" in n for n in names)
    assert any("accepted_values_fct_cart_events_label" in n for n in names)
    assert any("unique_stg_events_event_id" in n for n in names)
    assert any("relationships_fct_sessions_user_id__user_id__ref_dim_users_" in n for n in names)
    assert any("unique_dim_products_product_id" in n for n in names)
    assert len(tests) >= 15


def test_staging_types_and_splits_category(build: Build) -> None:
    rows = query(
        build.warehouse,
        "select event_id, event_date, category_l1, category_l2 from main.stg_events",
    )
    assert len(rows) == len(EVENTS)
    by_id = {r["event_id"]: r for r in rows}
    assert by_id["e00"]["event_date"] == D1 and by_id["e00b"]["event_date"] == D2
    assert (by_id["e17"]["category_l1"], by_id["e17"]["category_l2"]) == ("appliances", "kitchen")
    assert (by_id["e01"]["category_l1"], by_id["e01"]["category_l2"]) == (
        "electronics",
        "smartphone",
    )
    assert (by_id["e08"]["category_l1"], by_id["e08"]["category_l2"]) == (None, None)


def test_a_duplicate_event_in_silver_fails_the_build_before_any_model_reads_it(
    tmp_path: Path,
) -> None:
    """Silver holds each event_id once and stg_events does not deduplicate again: a copy of
    e14 planted in a second file of its partition (what a replayed write would leave had
    lake.build_silver not rewritten the date) fails stg_events' unique test, and dbt builds
    nothing that reads stg_events."""
    lake, workdir = tmp_path / "lake", tmp_path / "work"
    workdir.mkdir()
    write_silver(lake)
    copy = silver_frame(EVENTS).filter(pl.col("event_id") == "e14")
    copy.write_parquet(lake / "silver" / "events" / f"event_date={D2}" / "part-1.parquet")
    env = dbt_env(lake, tmp_path / "warehouse.duckdb", workdir)
    proc, results = run_dbt(["build", "--vars", json.dumps(VARS)], env, workdir)
    assert proc.returncode != 0
    status = {r["unique_id"]: (r["status"], r.get("failures")) for r in results}
    [unique] = [k for k in status if k.startswith("test.easymlops.unique_stg_events_event_id")]
    assert status[unique] == ("fail", 1)
    assert status["model.easymlops.stg_events"][0] == "success"
    downstream = {k: v[0] for k, v in status.items() if k.startswith("model.") and "stg_" not in k}
    assert len(downstream) == 8 and set(downstream.values()) == {"skipped"}, downstream


def test_labels(build: Build) -> None:
    rows = query(build.warehouse, "select event_id, label from main.fct_cart_events")
    assert {r["event_id"]: r["label"] for r in rows} == EXPECTED_LABELS
    training = training_rows(build.warehouse)
    assert {k: v[LABEL] for k, v in training.items()} == EXPECTED_LABELS


def test_session_features(build: Build) -> None:
    rows = training_rows(build.warehouse)
    session = [c for c in MODEL_FEATURES if c.startswith("session_")]
    # e04: after e01 view 101, e02 view 102, e03 view 101; session began 120 s earlier.
    assert {c: rows["e04"][c] for c in session} == {
        "session_events": 3,
        "session_views": 3,
        "session_product_views": 2,
        "session_carts": 0,
        "session_seconds": 120.0,
        "session_distinct_products": 2,
    }
    # e15: one view before it (e14); the purchase at the
    # same instant sorts after the cart, so it is not "before".
    assert {c: rows["e15"][c] for c in session} == {
        "session_events": 1,
        "session_views": 1,
        "session_product_views": 1,
        "session_carts": 0,
        "session_seconds": 10.0,
        "session_distinct_products": 1,
    }
    # e20 opens its session.
    assert {c: rows["e20"][c] for c in session} == dict.fromkeys(session, 0)
    assert rows["e04"]["price"] == 100.0


def test_user_features_are_point_in_time(build: Build) -> None:
    rows = training_rows(build.warehouse)
    user = [c for c in MODEL_FEATURES if c.startswith("user_")]
    # e07: user 2's first day -> no history at all.
    assert rows["e07"]["user_features_valid_from"] is None
    assert all(rows["e07"][c] is None for c in user)
    # e15: user 3 purchases on day 2, but as of day 2 only day 1 counts (one view, no purchase).
    assert rows["e15"]["user_features_valid_from"] == D2
    assert {c: rows["e15"][c] for c in user} == {
        "user_sessions": 1,
        "user_views": 1,
        "user_carts": 0,
        "user_purchases": 0,
        "user_purchase_rate": pytest.approx(1 / 5),
        "user_avg_price": 70.0,
    }
    # e18: user 2 was inactive on day 2, so day 3 uses the day-1 row; day 3's purchase is out.
    assert rows["e18"]["user_features_valid_from"] == D2
    assert (rows["e18"]["user_carts"], rows["e18"]["user_purchases"]) == (1, 1)
    # e20: user 1 through day 2: sessions s1, s3, s4; views e01 e02 e03 e10; carts e04 e11;
    # purchases e05 e13.
    assert rows["e20"]["user_features_valid_from"] == D3
    assert {c: rows["e20"][c] for c in user} == {
        "user_sessions": 3,
        "user_views": 4,
        "user_carts": 2,
        "user_purchases": 2,
        "user_purchase_rate": pytest.approx(3 / 7),
        "user_avg_price": pytest.approx((100 + 200 + 100 + 210) / 4),
    }


def test_user_feature_rows(build: Build) -> None:
    rows = query(
        build.warehouse,
        "select user_id, activity_date, valid_from, valid_to, user_sessions "
        "from main.user_features order by user_id, valid_from",
    )
    assert [(r["user_id"], r["valid_from"], r["valid_to"]) for r in rows] == [
        (1, D2, D3),
        (1, D3, date(2024, 3, 4)),
        (1, date(2024, 3, 4), None),
        (2, D2, date(2024, 3, 4)),
        (2, date(2024, 3, 4), None),
        (3, D2, D3),
        (3, D3, None),
    ]
    # s0 spans midnight: counted once, on the day it started.
    assert [r["user_sessions"] for r in rows if r["user_id"] == 3] == [1, 2]


def test_product_features_are_point_in_time(build: Build) -> None:
    rows = training_rows(build.warehouse)
    product = [c for c in MODEL_FEATURES if c.startswith("product_")]
    # e15 (product 101, day 2): day 1 had e01, e03 views, e04 cart, e05 purchase.
    assert rows["e15"]["product_features_valid_from"] == D2
    assert rows["e15"]["product_views"] == 2
    assert rows["e15"]["product_carts"] == 1
    assert rows["e15"]["product_purchases"] == 1
    assert rows["e15"]["product_conversion_rate"] == pytest.approx(2 / 6)
    # 101 (avg 100) vs. 102 (avg 200) in category 10 on day 1: median 150.
    assert rows["e15"]["product_price_vs_category"] == pytest.approx(100 / 150)
    # e20 (product 104, day 3): only day 1 (e00 view, e08 view, e09 purchase), none on day 2.
    assert rows["e20"]["product_features_valid_from"] == D2
    assert {c: rows["e20"][c] for c in product} == {
        "product_views": 2,
        "product_carts": 0,
        "product_purchases": 1,
        "product_conversion_rate": pytest.approx(2 / 5),
        "product_avg_price": 70.0,
        # 103 (avg 50) and 104 (avg 70) in category 20 on day 1: median 60.
        "product_price_vs_category": pytest.approx(70 / 60),
    }
    # e04: product 101 has no earlier day.
    assert rows["e04"]["product_features_valid_from"] is None
    assert all(rows["e04"][c] is None for c in product)


def test_no_training_row_sees_its_own_day(build: Build) -> None:
    for row in training_rows(build.warehouse).values():
        for column in ("user_features_valid_from", "product_features_valid_from"):
            assert row[column] is None or row[column] <= row["event_date"]


def test_training_set_columns_and_split(build: Build) -> None:
    columns = [r["column_name"] for r in query(build.warehouse, "describe main.training_set")]
    for column in (*MODEL_FEATURES, LABEL, "split", "event_id", "event_time", "event_date"):
        assert column in columns, column
    assert {"user_features_valid_from", "product_features_valid_from"} <= set(columns)
    rows = training_rows(build.warehouse)
    assert {k: v["split"] for k, v in rows.items()} == {
        "e04": "train",
        "e07": "train",
        "e11": "train",
        "e15": "train",
        "e18": "test",
        "e20": "test",
    }


def rows_by_key(warehouse: Path, table: str, key: str, columns: str) -> dict[Any, tuple[Any, ...]]:
    """`columns` (SQL list) of every row of `table`, as a tuple keyed by the row's `key`."""
    rows = query(warehouse, f"select {key} as row_key, {columns} from main.{table}")
    return {r.pop("row_key"): tuple(r.values()) for r in rows}


def test_sessions(build: Build) -> None:
    columns = (
        "user_id, session_date, session_start, session_end, duration_seconds, events, views, "
        "carts, removes, purchases, distinct_products, purchase_value, converted"
    )
    sessions = rows_by_key(build.warehouse, "fct_sessions", "user_session", columns)
    t = datetime.fromisoformat
    # fmt: off
    assert sessions == {
        # s0 crosses midnight: it belongs to day 1, and lasts 15 s.
        "s0": (3, D1, t("2024-03-01 23:59:50"), t("2024-03-02 00:00:05"), 15.0,
               2, 2, 0, 0, 0, 2, 0.0, 0),
        "s1": (1, D1, t("2024-03-01 10:00:00"), t("2024-03-01 10:05:00"), 300.0,
               5, 3, 1, 0, 1, 2, 100.0, 1),
        "s2": (2, D1, t("2024-03-01 11:00:00"), t("2024-03-01 11:03:00"), 180.0,
               4, 2, 1, 0, 1, 2, 70.0, 1),
        "s3": (1, D2, t("2024-03-02 09:00:00"), t("2024-03-02 09:02:00"), 120.0,
               3, 1, 1, 1, 0, 1, 0.0, 0),
        "s4": (1, D2, t("2024-03-02 15:00:00"), t("2024-03-02 15:00:00"), 0.0,
               1, 0, 0, 0, 1, 1, 210.0, 1),
        "s5": (3, D2, t("2024-03-02 12:00:00"), t("2024-03-02 12:00:10"), 10.0,
               3, 1, 1, 0, 1, 1, 100.0, 1),
        "s6": (2, D3, t("2024-03-03 08:00:00"), t("2024-03-03 08:05:00"), 300.0,
               3, 1, 1, 0, 1, 1, 50.0, 1),
        "s7": (1, D3, t("2024-03-03 10:00:00"), t("2024-03-03 10:00:00"), 0.0,
               1, 0, 1, 0, 0, 1, 0.0, 0),
    }
    # fmt: on
    intermediate = rows_by_key(build.warehouse, "int_sessions", "user_session", "events")
    assert intermediate == {k: (v[5],) for k, v in sessions.items()}


def test_dim_users(build: Build) -> None:
    columns = (
        "first_seen, last_seen, sessions, converted_sessions, events, views, carts, removes, "
        "purchases, purchase_value"
    )
    users = rows_by_key(build.warehouse, "dim_users", "user_id", columns)
    t = datetime.fromisoformat
    assert users == {
        # s1 s3 s4 s7; purchases e05 (100) and e13 (210)
        1: (t("2024-03-01 10:00:00"), t("2024-03-03 10:00:00"), 4, 2, 10, 4, 3, 1, 2, 310.0),
        # s2 s6; purchases e09 (70) and e19 (50)
        2: (t("2024-03-01 11:00:00"), t("2024-03-03 08:05:00"), 2, 2, 7, 3, 2, 0, 2, 120.0),
        # s0 s5; views e00 e00b e14, purchase e16 (100)
        3: (t("2024-03-01 23:59:50"), t("2024-03-02 12:00:10"), 2, 1, 5, 3, 1, 0, 1, 100.0),
    }


def test_dim_products(build: Build) -> None:
    columns = (
        "category_id, category_code, category_l1, brand, last_price, first_seen, last_seen, "
        "events, views, carts, removes, purchases"
    )
    products = rows_by_key(build.warehouse, "dim_products", "product_id", columns)
    t = datetime.fromisoformat
    phone = (10, "electronics.smartphone", "electronics")
    # fmt: off
    assert products == {
        # attributes are constant in the fixture; last_price tells the latest event (see 102)
        101: (*phone, "acme", 100.0, t("2024-03-01 10:00:00"), t("2024-03-02 12:00:10"),
              8, 4, 2, 0, 2),
        # viewed at 200 on day 1, last seen at 210 (e13): the latest event wins
        102: (*phone, None, 210.0, t("2024-03-01 10:00:30"), t("2024-03-02 15:00:00"),
              5, 2, 1, 1, 1),
        103: (20, "appliances.kitchen.washer", "appliances", "wash", 50.0,
              t("2024-03-01 11:00:00"), t("2024-03-03 08:05:00"), 5, 2, 2, 0, 1),
        # first seen at e08 (11:02); e00 comes later that day (23:59:50)
        104: (20, None, None, None, 70.0, t("2024-03-01 11:02:00"), t("2024-03-03 10:00:00"),
              4, 2, 1, 0, 1),
    }
    # fmt: on


def copy_warehouse(build: Build, name: str) -> tuple[Path, dict[str, str], Path]:
    """A private copy of the built warehouse and a dbt environment pointing at it."""
    base = build.warehouse.parent / name
    base.mkdir()
    warehouse = base / "warehouse.duckdb"
    shutil.copy(build.warehouse, warehouse)
    env = {**build.env, "EASYMLOPS_WAREHOUSE_PATH": str(warehouse)}
    return warehouse, env, base


def test_range_join_matches_asof_join(build: Build) -> None:
    """The portable point-in-time join (used on postgres) gives the same rows as ASOF."""
    warehouse, env, workdir = copy_warehouse(build, "range-join")
    vars_ = json.dumps({**VARS, "point_in_time_join": "range"})
    proc, _ = run_dbt(["run", "-s", "training_set", "--vars", vars_], env, workdir)
    assert proc.returncode == 0, proc.stdout[-6000:]
    compiled = next((workdir / "target" / "run").rglob("training_set.sql")).read_text()
    code = "\n".join(line.split("--")[0] for line in compiled.lower().splitlines())
    assert "asof" not in code  # comments may say "asof"; the SQL must not
    assert training_rows(warehouse) == training_rows(build.warehouse)


def test_point_in_time_check_catches_a_leak(build: Build, tmp_path: Path) -> None:
    """Plant the realistic leak in a copy of the project: user feature rows valid on their own
    activity day (`valid_from = activity_date`), so a cart sees the rest of its own day. The
    join and the audit columns look fine; `assert_point_in_time` recomputes history from the
    events and must fail, naming the rows of users active before on the cart's day."""
    project = tmp_path / "dbt_project"
    shutil.copytree(PROJECT_DIR, project, ignore=shutil.ignore_patterns("target", "logs"))
    model = project / "models" / "features" / "user_features.sql"
    sql = model.read_text()
    assert "activity_date + 1 as valid_from," in sql
    model.write_text(
        sql.replace("activity_date + 1 as valid_from,", "activity_date as valid_from,")
    )
    warehouse, env, workdir = copy_warehouse(build, "leak")
    proc, _ = run_dbt(
        ["run", "-s", "user_features", "training_set", "--vars", json.dumps(VARS)],
        env,
        workdir,
        project,
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    proc, results = run_dbt(
        ["test", "-s", "assert_point_in_time", "--vars", json.dumps(VARS)], env, workdir, project
    )
    assert proc.returncode != 0
    [result] = results
    assert result["unique_id"] == "test.easymlops.assert_point_in_time"
    assert result["status"] == "fail"
    # Every cart's own day now has a user row valid that day (the cart itself is in it), so
    # every training row joins its own day: each one is a failure of the check.
    leaked = query(
        warehouse,
        "select t.event_id from main.training_set t where t.user_features_valid_from = "
        "t.event_date order by 1",
    )
    assert result["failures"] == len(leaked) > 0


def test_label_maturity_leaves_out_carts_of_sessions_that_may_go_on(build: Build) -> None:
    """With a 30-minute session timeout, e20's session (its cart is the newest event of the
    data) may still go on: its label could still turn to 1, so it is in neither split; every
    other cart's session ended over 30 minutes before the data closes."""
    warehouse, env, workdir = copy_warehouse(build, "maturity")
    vars_ = json.dumps({**VARS, "session_timeout_seconds": 1800})
    proc, _ = run_dbt(["run", "-s", "training_set", "--vars", vars_], env, workdir)
    assert proc.returncode == 0, proc.stdout[-6000:]
    rows = training_rows(warehouse)
    assert set(rows) == set(EXPECTED_LABELS) - {"e20"}
    # The test split is the last day of mature carts: e18 (day 3) alone.
    assert {k for k, v in rows.items() if v["split"] == "test"} == {"e18"}
    # e20 is still in fct_cart_events: maturity only keeps it out of training and testing.
    assert "e20" in {r[0] for r in cart_event_rows(warehouse)}


def cart_event_rows(warehouse: Path) -> list[tuple[Any, ...]]:
    with duckdb.connect(str(warehouse), read_only=True) as con:
        return con.execute("select * from main.fct_cart_events order by event_id").fetchall()


# Session s0 (user 3) continued: a cart of 104 on day 2 after the view of 104 at 23:59:50 on
# day 1, and its purchase just after midnight on day 3.
MIDNIGHT_EVENTS = [
    ("e21", "2024-03-02 00:00:30", "cart", 104, 70.0, 3, "s0"),
    ("e22", "2024-03-03 00:00:10", "purchase", 104, 70.0, 3, "s0"),
]


def test_daily_partitions_one_day_at_a_time_equal_the_one_shot_build(
    build: Build, tmp_path: Path
) -> None:
    """fct_cart_events is a daily partitioned (incremental) model: building it one date at a
    time (EASYMLOPS_DBT_MIN_DATE/_MAX_DATE, as Dagster's partitions do), in any order, gives the
    rows of the one-shot build, including e21 whose session started the day before (session
    features) and whose purchase comes the day after (label). Rebuilding a date replaces it."""
    lake, workdir = tmp_path / "lake", tmp_path / "work"
    workdir.mkdir()
    frame = silver_frame(EVENTS + MIDNIGHT_EVENTS)
    for (day,), part in frame.group_by(pl.col("event_time").dt.date()):
        directory = lake / "silver" / "events" / f"event_date={day}"
        directory.mkdir(parents=True)
        part.write_parquet(directory / "part-0.parquet")
    one_shot, per_day = tmp_path / "one_shot.duckdb", tmp_path / "per_day.duckdb"
    proc, _ = run_dbt(["run", "-s", "+fct_cart_events"], dbt_env(lake, one_shot, workdir), workdir)
    assert proc.returncode == 0, proc.stdout[-6000:]
    env = dbt_env(lake, per_day, workdir)
    proc, _ = run_dbt(["run", "-s", "stg_events"], env, workdir)
    assert proc.returncode == 0, proc.stdout[-6000:]
    for day in (D3, D1, D2, D2):
        window = {"EASYMLOPS_DBT_MIN_DATE": str(day), "EASYMLOPS_DBT_MAX_DATE": str(day)}
        proc, _ = run_dbt(["run", "-s", "fct_cart_events"], env | window, workdir)
        assert proc.returncode == 0, proc.stdout[-6000:]
    assert cart_event_rows(per_day) == cart_event_rows(one_shot)
    [e21] = query(per_day, "select * from main.fct_cart_events where event_id = 'e21'")
    assert (e21["label"], e21["session_events"], e21["session_product_views"]) == (1, 2, 1)
    assert len(cart_event_rows(per_day)) == len(EXPECTED_LABELS) + 1


def test_a_daily_partition_rebuild_leaves_other_dates_alone(build: Build) -> None:
    """A window rebuild deletes and re-inserts only its dates: rows of other dates that were
    tampered with stay tampered, the window's rows come back right."""
    warehouse, env, workdir = copy_warehouse(build, "window")
    with duckdb.connect(str(warehouse)) as con:
        con.execute("update main.fct_cart_events set label = 9")
    window = {"EASYMLOPS_DBT_MIN_DATE": str(D2), "EASYMLOPS_DBT_MAX_DATE": str(D3)}
    proc, _ = run_dbt(
        ["run", "-s", "fct_cart_events", "--vars", json.dumps(VARS)], env | window, workdir
    )
    assert proc.returncode == 0, proc.stdout[-6000:]
    labels = {
        r["event_id"]: (r["event_date"], r["label"])
        for r in query(warehouse, "select event_id, event_date, label from main.fct_cart_events")
    }
    assert {e: lab for e, (d, lab) in labels.items() if d == D1} == {"e04": 9, "e07": 9}
    assert {e: lab for e, (d, lab) in labels.items() if d != D1} == {
        e: EXPECTED_LABELS[e] for e in ("e11", "e15", "e18", "e20")
    }


def test_a_dagster_run_of_one_date_reuses_the_parse_of_prepare_manifest(tmp_path: Path) -> None:
    """`prepare_manifest` parses with the vars, target and environment of the runs, so a run's
    dbt (which dagster-dbt starts with a copy of partial_parse.msgpack) re-parses only the model
    that reads the run's dates, instead of the whole project (~5 s of CPU per dbt step)."""
    from easymlops.settings import Settings
    from easymlops.warehouse import dbt_env, dbt_target, dbt_vars, prepare_manifest

    settings = Settings(home=tmp_path / "home")
    before = dict(os.environ)
    prepare_manifest(settings)
    assert dict(os.environ) == before  # the dbt environment must not outlive the parse
    workdir = tmp_path / "work"
    (workdir / "target").mkdir(parents=True)
    shutil.copy(PROJECT_DIR / "target" / "partial_parse.msgpack", workdir / "target")
    env = {**os.environ, **dbt_env(settings, (D1, D2)), "DBT_SEND_ANONYMOUS_USAGE_STATS": "false"}
    proc, _ = run_dbt(
        ["ls", "-s", "tag:daily", "--target", dbt_target(settings), "--vars", dbt_vars(settings)],
        env,
        workdir,
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    log = (workdir / "logs" / "dbt.log").read_text()
    assert "Unable to do partial parsing" not in log, log[-4000:]
    assert "Partial parsing: updated file: easymlops://models/marts/fct_cart_events.sql" in log
