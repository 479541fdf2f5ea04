"""The warehouse dbt builds gold into and training, the online store and monitoring read (and
cart scores are written to): DuckDB (embedded) or PostgreSQL (production), chosen by
`Settings.warehouse_backend`; and how dbt is told."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from easymlops import lake, s3
from easymlops.settings import Settings

DBT_PROJECT_DIR = Path(__file__).resolve().parent.parent / "dbt_project"


def dbt_env(settings: Settings, window: tuple[date, date] | None = None) -> dict[str, str]:
    """Environment for dbt: absolute paths, so dbt's working directory does not matter; for a
    lake on S3 also the DuckDB extensions and S3 secret that profiles.yml gives dbt-duckdb (S3
    endpoint and keys: the AWS_* variables of the environment). `window` (first, last date,
    inclusive) restricts the daily partitioned models (tag:daily) to those dates; without one
    the variables are set empty, so a window never outlives its run in a process that runs
    several (macros/daily_window.sql)."""
    settings.warehouse.parent.mkdir(parents=True, exist_ok=True)
    first, last = (window[0].isoformat(), window[1].isoformat()) if window else ("", "")
    env = {
        "EASYMLOPS_WAREHOUSE_PATH": str(settings.warehouse.resolve()),
        "EASYMLOPS_LAKE_ROOT": settings.lake,
        "EASYMLOPS_DBT_MIN_DATE": first,
        "EASYMLOPS_DBT_MAX_DATE": last,
    }
    if settings.warehouse_backend == "postgres":
        # What profiles.yml's postgres target reads: the resource's values, not only the
        # process environment's (a run may override them).
        env |= settings.pg_env
    return env | (s3.duckdb_dbt_env() if s3.is_s3(settings.lake) else {})


def dbt_target(settings: Settings) -> str:
    """The profiles.yml target of the backend (the targets are named after the backends)."""
    return settings.warehouse_backend


def dbt_vars(settings: Settings) -> str:
    """--vars of every dbt run of these settings, and of the parse (`prepare_manifest`): the same
    for all runs, which partial parsing needs (the dates of a run go in `dbt_env`)."""
    values: dict[str, object] = {
        "lake_root": settings.lake,
        "holdout_days": settings.holdout_days,
        "session_timeout_seconds": settings.session_timeout_seconds,
    }
    return json.dumps(values)


def export_dbt_env(settings: Settings, window: tuple[date, date] | None = None) -> None:
    os.environ.update(dbt_env(settings, window))


def connect(settings: Settings, *, read_only: bool = True) -> duckdb.DuckDBPyConnection:
    """A connection to the DuckDB warehouse; dbt holds the write lock only while it runs. With
    the lake on S3 it can read S3, as the staging views over silver do. Backend-neutral reads go
    through `reader`."""
    con = duckdb.connect(str(settings.warehouse), read_only=read_only)
    if s3.is_s3(settings.lake):
        s3.enable_duckdb_s3(con)
    return con


def postgres_connect(settings: Settings) -> Any:
    """A psycopg2 connection to the PostgreSQL warehouse, unqualified names in pg_schema."""
    import psycopg2

    return psycopg2.connect(
        host=settings.pg_host,
        port=settings.pg_port,
        user=settings.pg_user,
        password=settings.pg_password_resolved,
        dbname=settings.pg_dbname,
        options=f"-c search_path={settings.pg_schema}",
    )


# PostgreSQL type oids -> the polars types DuckDB's Arrow result has for the same dbt columns,
# so a frame is the same whichever backend built it. numeric (avg of integers) reads as float,
# as DuckDB's double.
_PG_TYPES: dict[int, pl.DataType] = {
    16: pl.Boolean(),
    20: pl.Int64(),
    21: pl.Int16(),
    23: pl.Int32(),
    25: pl.String(),
    700: pl.Float32(),
    701: pl.Float64(),
    1043: pl.String(),
    1082: pl.Date(),
    1114: pl.Datetime("us"),
    1184: pl.Datetime("us", "UTC"),
    1700: pl.Float64(),
}


class Reader:
    """Reads of the warehouse in one connection, the same SQL on both backends: parameters are
    `?` placeholders (DuckDB's; rewritten to psycopg2's `%s` for PostgreSQL), and only SQL that
    both dialects share (the queries here and in training / online_store are tested on both)."""

    def __init__(self, settings: Settings, con: Any) -> None:
        self.backend = settings.warehouse_backend
        self._con = con

    def _sql(self, sql: str) -> str:
        return sql if self.backend == "duckdb" else sql.replace("%", "%%").replace("?", "%s")

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        if self.backend == "duckdb":
            return self._con.execute(sql, list(params)).fetchall()
        with self._con.cursor() as cursor:
            cursor.execute(self._sql(sql), list(params))
            return [tuple(row) for row in cursor.fetchall()]

    def frame(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        if self.backend == "duckdb":
            return self._con.execute(sql, list(params)).pl()  # (an empty result too)
        with self._con.cursor() as cursor:
            cursor.execute(self._sql(sql), list(params))
            schema = {d.name: _PG_TYPES.get(d.type_code, pl.Object()) for d in cursor.description}
            rows = cursor.fetchall()
        # numeric values (Decimal) become floats; the other types are as polars wants them.
        floats = [t == pl.Float64() for t in schema.values()]
        return pl.DataFrame(
            [
                tuple(
                    float(v) if f and v is not None else v for v, f in zip(r, floats, strict=True)
                )
                for r in rows
            ],
            schema=schema,
            orient="row",
        )


@contextmanager
def reader(settings: Settings) -> Iterator[Reader]:
    """A read-only session on the warehouse of `settings.warehouse_backend`."""
    if settings.warehouse_backend == "duckdb":
        with connect(settings) as con:
            yield Reader(settings, con)
        return
    con = postgres_connect(settings)
    try:
        con.set_session(readonly=True, autocommit=True)
        yield Reader(settings, con)
    finally:
        con.close()


def query(settings: Settings, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    with reader(settings) as r:
        return r.rows(sql, params)


def query_frame(settings: Settings, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
    with reader(settings) as r:
        return r.frame(sql, params)


# On PostgreSQL dbt reads silver from this table (the dbt source `lake.silver_events`; on DuckDB
# the source is the Parquet files themselves). Its columns: the event's and event_date (from the
# partition directory), what the source declares (session_seq is the lake's own).
SILVER_TABLE = "lake.silver_events"
SILVER_TABLE_COLUMNS: dict[str, pl.DataType] = {**lake.EVENT_COLUMNS, "event_date": pl.Date()}
_PG_COLUMN_TYPES = {
    pl.String(): "text",
    pl.Int64(): "bigint",
    pl.Int32(): "integer",
    pl.Float64(): "double precision",
    pl.Datetime("us"): "timestamp",
    pl.Date(): "date",
}


def load_silver(settings: Settings, first: date, end: date) -> int:
    """Replace the dates [first, end) of the PostgreSQL table lake.silver_events with the lake's
    silver of those dates, in one transaction: a rerun of a date rewrites it, never appends
    twice, and dbt never sees a half-loaded date. Returns the rows loaded."""
    from psycopg2.extras import execute_values

    frame = lake.read_silver(settings, first, end).select(
        [pl.col(name).cast(dtype) for name, dtype in SILVER_TABLE_COLUMNS.items()]
    )
    columns = ", ".join(frame.columns)
    ddl = ", ".join(f"{name} {_PG_COLUMN_TYPES[dtype]}" for name, dtype in frame.schema.items())
    con = postgres_connect(settings)
    try:
        with con, con.cursor() as cursor:
            cursor.execute("create schema if not exists lake")
            cursor.execute(f"create table if not exists {SILVER_TABLE} ({ddl})")
            cursor.execute(
                f"delete from {SILVER_TABLE} where event_date >= %s and event_date < %s",
                [first, end],
            )
            execute_values(
                cursor,
                f"insert into {SILVER_TABLE} ({columns}) values %s",
                frame.iter_rows(),
                page_size=5000,
            )
    finally:
        con.close()
    return frame.height


def _identifier(name: str) -> str:
    """`name` for SQL text, refused unless a plain lower-case identifier: names come from the
    code, and PostgreSQL folds unquoted ones to lower case (a mixed-case column would never
    match information_schema, and the table would be recreated on every write)."""
    if not re.fullmatch(r"[a-z_][a-z0-9_]*", name):
        raise ValueError(f"not a plain lower-case SQL identifier: {name!r}")
    return name


def replace_date(settings: Settings, table: str, day: date, frame: pl.DataFrame) -> None:
    """Replace the rows of `day` (column event_date) of the warehouse table `table` with `frame`,
    in one transaction on either backend: a rerun of a date rewrites it, never appends twice. The
    table takes its columns from the frame; a frame of another shape (a new feature set)
    replaces the table."""
    table = _identifier(table)
    for column in frame.columns:
        _identifier(column)
    if settings.warehouse_backend == "duckdb":
        with connect(settings, read_only=False) as con:
            con.register("day_rows", frame.to_arrow())
            con.execute(f"create table if not exists {table} as select * from day_rows limit 0")
            same = [c[0] for c in con.execute(f"describe {table}").fetchall()] == frame.columns
            if not same:
                con.execute(f"create or replace table {table} as select * from day_rows limit 0")
            con.execute(f"delete from {table} where event_date = ?", [day])
            con.execute(f"insert into {table} select * from day_rows")
        return
    from psycopg2.extras import execute_values

    ddl = ", ".join(f"{name} {_PG_COLUMN_TYPES[dtype]}" for name, dtype in frame.schema.items())
    con = postgres_connect(settings)
    try:
        with con, con.cursor() as cursor:
            cursor.execute(f"create table if not exists {table} ({ddl})")
            cursor.execute(
                "select column_name from information_schema.columns "
                "where table_schema = current_schema() and table_name = %s "
                "order by ordinal_position",
                [table],
            )
            if [row[0] for row in cursor.fetchall()] != frame.columns:
                cursor.execute(f"drop table {table}")
                cursor.execute(f"create table {table} ({ddl})")
            cursor.execute(f"delete from {table} where event_date = %s", [day])
            execute_values(
                cursor,
                f"insert into {table} ({', '.join(frame.columns)}) values %s",
                frame.iter_rows(),
                page_size=5000,
            )
    finally:
        con.close()


def prepare_manifest(settings: Settings | None = None) -> Path:
    """Run `dbt parse` so `target/manifest.json` exists (Dagster builds the dbt assets from it).

    Parsed with the target, --vars and environment a Dagster run of these settings gives dbt, so
    that its `partial_parse.msgpack` (which dagster-dbt copies into each run's target path) is
    valid for those runs: dbt parses the whole project again (~5 s of CPU) when the vars, the
    profile or the target differ from the parse's. Called by `make`, the CLI and tests before
    the definitions load, never at import time."""
    from dbt.cli.main import dbtRunner

    from easymlops.settings import get_settings

    settings = settings or get_settings()
    args = ["parse", "--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR)]
    args += ["--target", dbt_target(settings), "--vars", dbt_vars(settings), "--quiet"]
    # dbt reads its environment from os.environ; the caller's is restored afterwards, so these
    # values never shadow the settings of a later `get_settings()` in the same process.
    env = dbt_env(settings)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        result = dbtRunner().invoke(args)
    finally:
        # Only the keys set above: clearing the whole environment, even briefly, would show
        # other threads of this process (a code server's) an empty one.
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    if not result.success:
        raise RuntimeError(f"dbt parse failed: {result.exception}")
    return DBT_PROJECT_DIR / "target" / "manifest.json"


def row_counts(settings: Settings, tables: list[str]) -> dict[str, int]:
    """Rows per table (or view) of the warehouse; names not found are left out."""
    with reader(settings) as r:
        existing = {
            row[0]
            for row in r.rows(
                "select table_name from information_schema.tables "
                "where table_schema = current_schema()"
            )
        }
        counts = {}
        for name in tables:
            if name in existing:
                row = r.rows(f"select count(*) from {_identifier(name)}")
                counts[name] = int(row[0][0]) if row else 0
        return counts


def row_counts_by_date(
    settings: Settings, table: str, first: date, last: date, column: str = "event_date"
) -> dict[str, int]:
    """Rows per date of a daily partitioned table for the dates in [first, last]."""
    table, column = _identifier(table), _identifier(column)
    rows = query(
        settings,
        f"select cast({column} as varchar), count(*) from {table} "
        f"where {column} between ? and ? group by 1",
        [first, last],
    )
    return {day: int(count) for day, count in rows}
