"""Lakehouse throughput: bronze -> silver -> gold by the project's path (`lake.build_silver`, then
`dbt run` of the gold models on DuckDB) against a pandas implementation of the same transforms,
on the same bronze Delta table, measured in the same run.

Each stage runs in a process of its own and the parent reads that process's peak resident memory
(`os.wait4` -> ru_maxrss, which covers native memory: Arrow, DuckDB, polars), and its wall time,
interpreter start and imports included. The gold stage of the project is the dbt CLI itself, run
as Dagster runs it (`dbt run`: the models, not the dbt tests, since the pandas path tests nothing).
Before any figure is printed, the outputs of both paths are compared in full: silver row for row
(event_id, session_seq, event_date) and the training set column for column.

Bronze is generated once per (--events, --seed) and cached under `.easymlops/bench/`: events from
`easymlops.generator`, landed as `lake.land_topic` would land them (one Delta append per landing
of --chunk events, with the Kafka columns), plus a replay of ~1% of the events in the next landing
so that deduplication has work to do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
PROJECT_DIR = ROOT / "dbt_project"
DBT = Path(sys.executable).parent / "dbt"
START = date(2024, 3, 1)  # fixed, so a cached bronze stays valid whatever the day
LANDED = datetime(2024, 3, 8)
DAYS = 7
REPLAY_SHARE = 0.01
HOLDOUT_DAYS = 1
SESSION_TIMEOUT_SECONDS = 1800  # label maturity (training_set), passed to dbt as a var too
GOLD = ("fct_cart_events", "user_features", "product_features", "training_set")
# Goals (issue 15) at the default size: rows/s at least 4x pandas', at most half its peak memory.
GOAL_EVENTS = 10_000_000
GOAL_RATE = 4.0
GOAL_MEMORY = 0.5
PATHS = {"project": ("project-silver", "project-gold"), "pandas": ("pandas-silver", "pandas-gold")}


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class Layout:
    """Where everything of one benchmark lives (`base` survives runs; `run` does not)."""

    base: Path

    @property
    def bronze(self) -> Path:
        return self.base / "lake" / "bronze" / "events"

    @property
    def complete(self) -> Path:
        return self.base / "bronze.complete"

    @property
    def run(self) -> Path:
        return self.base / "run"

    @property
    def home(self) -> Path:  # EASYMLOPS_HOME of the project's path: its lake is base/lake
        return self.base

    @property
    def warehouse(self) -> Path:
        return self.run / "warehouse.duckdb"

    @property
    def pandas_silver(self) -> Path:
        return self.run / "pandas" / "silver" / "events"

    @property
    def pandas_gold(self) -> Path:
        return self.run / "pandas" / "gold"


# ---- bronze --------------------------------------------------------------------------------------
def generate_bronze(layout: Layout, n_events: int, seed: int, chunk: int) -> int:
    """Land `n_events` generated events (and the replays) as bronze; returns the rows landed.
    One day of events at a time from the generator, one chunk at a time in memory."""
    import numpy as np
    import polars as pl
    from deltalake import write_deltalake

    from easymlops.generator import generate_events
    from easymlops.lake import EVENT_COLUMNS

    shutil.rmtree(layout.base / "lake", ignore_errors=True)
    layout.complete.unlink(missing_ok=True)
    rng = np.random.default_rng([seed, 7])
    next_offset = np.zeros(3, dtype=np.int64)
    replay: pl.DataFrame | None = None
    landed = landings = 0
    started = time.monotonic()

    def land(frame: pl.DataFrame) -> None:
        nonlocal landed, landings
        # Keyed by session as the producers key it: a session's events share a partition.
        parts = (frame["user_session"].hash(seed=0) % 3).cast(pl.Int32).to_numpy()
        offsets = np.empty(len(parts), dtype=np.int64)
        for p in range(3):
            mask = parts == p
            offsets[mask] = next_offset[p] + np.arange(int(mask.sum()))
            next_offset[p] += int(mask.sum())
        frame = frame.with_columns(
            pl.lit("bench-topic-id").alias("kafka_topic_id"),
            pl.Series("kafka_partition", parts, dtype=pl.Int32),
            pl.Series("kafka_offset", offsets, dtype=pl.Int64),
            pl.lit(LANDED + timedelta(seconds=landings), dtype=pl.Datetime("us")).alias(
                "landed_at"
            ),
        )
        write_deltalake(str(layout.bronze), frame.to_arrow(), mode="append")
        landed += frame.height
        landings += 1

    buffer: list[dict[str, object]] = []
    events = generate_events(n_events, days=DAYS, seed=seed, start=START)
    for i, event in enumerate(events, start=1):
        buffer.append(event)
        if len(buffer) < chunk and i < n_events:
            continue
        frame = pl.from_dicts(
            buffer,
            schema={k: (pl.String() if k == "event_time" else t) for k, t in EVENT_COLUMNS.items()},
        ).with_columns(
            pl.col("event_time").str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us")
        )
        buffer.clear()
        # The previous landing's replayed share lands again here (a producer retry / replay).
        land(frame if replay is None else pl.concat([frame, replay]))
        replay = frame.filter(pl.Series(rng.random(frame.height) < REPLAY_SHARE))
        say(f"  generated {i:,} / {n_events:,} events ({time.monotonic() - started:.0f} s)")
    if replay is not None and replay.height:
        land(replay)
    layout.complete.write_text(json.dumps({"events": n_events, "seed": seed, "rows": landed}))
    return landed


# ---- the project's path --------------------------------------------------------------------------
def project_silver(layout: Layout) -> int:
    from easymlops.lake import build_silver
    from easymlops.settings import Settings

    # Explicit values win over any EASYMLOPS_* of the environment: the lake is the bench's.
    result = build_silver(Settings(home=layout.home, lake_uri=""))
    return result.rows


def prepare_dbt_parse(layout: Layout) -> None:
    """`dbt parse` into the gold stage's target path, untimed: a Dagster run of the gold models
    starts from the parse its code location prepared (`warehouse.prepare_manifest`; dagster-dbt
    copies its partial_parse.msgpack into each run's target), so the run parses nothing. Without
    this, the timed `dbt run` would parse the whole project (~2 s here), a cost Dagster pays at
    deployment, not per run."""
    command, env = dbt_command(layout, "parse")
    subprocess.run(command, env=env, cwd=layout.run, check=True, capture_output=True)


def dbt_command(layout: Layout, verb: str = "run") -> tuple[list[str], dict[str, str]]:
    """`dbt run` of the gold models as Dagster runs it (the CLI in a subprocess), on the bench's
    lake and a DuckDB warehouse of its own; artifacts stay out of the repository's dbt_project.
    `verb="parse"` gives the `dbt parse` with the same settings, whose parse the run reuses."""
    work = layout.run / "dbt"
    work.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASYMLOPS_", "DBT_"))}
    env.update(
        EASYMLOPS_LAKE_ROOT=str(layout.base / "lake"),
        EASYMLOPS_WAREHOUSE_PATH=str(layout.warehouse),
        DBT_SEND_ANONYMOUS_USAGE_STATS="false",
        DBT_VERSION_CHECK="false",
    )
    # training_set and everything it is built from: the gold the pandas path implements
    select = ["--select", "+training_set"] if verb == "run" else []
    command = [
        str(DBT),
        verb,
        *select,
        "--vars",
        json.dumps(
            {"holdout_days": HOLDOUT_DAYS, "session_timeout_seconds": SESSION_TIMEOUT_SECONDS}
        ),
        "--project-dir",
        str(PROJECT_DIR),
        "--profiles-dir",
        str(PROJECT_DIR),
        "--target-path",
        str(work / "target"),
        "--log-path",
        str(work / "logs"),
    ]
    return command, env


# ---- the pandas path -----------------------------------------------------------------------------
def pandas_silver(layout: Layout) -> int:
    """lake.build_silver in pandas: dedup by event_id (first landed wins), sort, event_date,
    session_seq, one Parquet file per event date."""
    import pandas as pd
    from deltalake import DeltaTable

    from easymlops.lake import EVENT_COLUMNS

    bronze = DeltaTable(str(layout.bronze)).to_pandas()
    bronze = bronze.sort_values(["landed_at", "kafka_partition", "kafka_offset"], kind="stable")
    silver = bronze.drop_duplicates("event_id", keep="first")[list(EVENT_COLUMNS)]
    del bronze
    silver = silver.sort_values(["user_session", "event_time", "event_id"], kind="stable")
    # Position among the session's events of the same date (silver partitions are per date).
    days = silver["event_time"].dt.normalize()
    silver["session_seq"] = (
        silver.groupby(["user_session", days], sort=False).cumcount().astype("int32")
    )
    for day, part in silver.groupby(days, sort=True):
        directory = layout.pandas_silver / f"event_date={pd.Timestamp(day).date()}"
        directory.mkdir(parents=True, exist_ok=True)
        part.to_parquet(directory / "part-0.parquet", index=False)
    return len(silver)


def pandas_gold(layout: Layout) -> int:
    """The dbt models in pandas: stg_events, fct_cart_events, user_features, product_features
    and training_set (point in time via merge_asof), each written as a Parquet file (dbt
    materializes them as DuckDB tables)."""
    import numpy as np
    import pandas as pd

    silver = pd.read_parquet(layout.pandas_silver)
    # stg_events: typed silver (silver holds each event_id once). The partition column comes
    # back as a category; the date is the event's day anyway.
    events = silver.drop(columns=["event_date", "session_seq", "category_code", "brand"])
    del silver
    events["event_date"] = events["event_time"].dt.normalize()
    rank = {"view": 0, "cart": 1, "remove_from_cart": 2, "purchase": 3}
    events["funnel_rank"] = events["event_type"].map(rank).astype("int8")
    events["is_view"] = (events["event_type"] == "view").astype("int64")
    events["is_cart"] = (events["event_type"] == "cart").astype("int64")
    events["is_purchase"] = (events["event_type"] == "purchase").astype("int64")
    out = layout.pandas_gold
    out.mkdir(parents=True, exist_ok=True)

    # fct_cart_events: order inside a session = event_time, funnel_rank, event_id.
    ordered = events.sort_values(["user_session", "event_time", "funnel_rank", "event_id"])
    by_product = ordered.groupby(["user_session", "product_id"], sort=False)
    ordered["session_product_views"] = by_product["is_view"].cumsum() - ordered["is_view"]
    later_purchases = (
        by_product["is_purchase"].transform("sum") - by_product["is_purchase"].cumsum()
    )
    ordered["label"] = (later_purchases > 0).astype("int32")
    by_session = ordered.groupby("user_session", sort=False)
    ordered["session_events"] = by_session.cumcount().astype("int64")
    ordered["session_views"] = by_session["is_view"].cumsum() - ordered["is_view"]
    ordered["session_carts"] = by_session["is_cart"].cumsum() - ordered["is_cart"]
    first_view = ((ordered["is_view"] == 1) & (ordered["session_product_views"] == 0)).astype(
        "int64"
    )
    ordered["session_distinct_products"] = (
        first_view.groupby(ordered["user_session"], sort=False).cumsum() - first_view
    )
    session_start = by_session["event_time"].transform("first")
    ordered["session_seconds"] = (ordered["event_time"] - session_start).dt.total_seconds()
    carts = ordered[ordered["event_type"] == "cart"][
        [
            "event_id",
            "event_time",
            "event_date",
            "user_id",
            "product_id",
            "category_id",
            "user_session",
            "price",
            "label",
            "session_events",
            "session_views",
            "session_product_views",
            "session_carts",
            "session_seconds",
            "session_distinct_products",
        ]
    ]
    del ordered, by_product, by_session, session_start, first_view, later_purchases
    carts.to_parquet(out / "fct_cart_events.parquet", index=False)

    # Label maturity (training_set): a cart counts once its session has been idle for the
    # timeout before the data closes (the newest event).
    session_end = events.groupby("user_session")["event_time"].max()
    closed_at = events["event_time"].max()

    # user_features: cumulative per user over days <= A, valid from A + 1.
    # Dates stay in the unit Parquet gave them (us): merge_asof needs equal key dtypes.
    date_type = events["event_date"].dtype
    one_day = pd.Timedelta(days=1)
    session_days = events.groupby(["user_id", "user_session"])["event_date"].min()
    new_sessions = session_days.groupby(["user_id", session_days]).size().rename("new_sessions")
    events["view_price"] = events["price"].where(events["is_view"] == 1, 0.0)
    daily = events.groupby(["user_id", "event_date"]).agg(
        views=("is_view", "sum"),
        carts=("is_cart", "sum"),
        purchases=("is_purchase", "sum"),
        view_price_sum=("view_price", "sum"),
    )
    daily = daily.join(new_sessions).fillna({"new_sessions": 0}).reset_index()
    daily = daily.rename(columns={"event_date": "activity_date"}).sort_values(
        ["user_id", "activity_date"]
    )
    history = daily.groupby("user_id", sort=False)
    users = pd.DataFrame(
        {
            "user_id": daily["user_id"],
            "activity_date": daily["activity_date"],
            "valid_from": (daily["activity_date"] + one_day).astype(date_type),
            "valid_to": (history["activity_date"].shift(-1) + one_day).astype(date_type),
            "user_sessions": history["new_sessions"].cumsum().astype("int64"),
            "user_views": history["views"].cumsum(),
            "user_carts": history["carts"].cumsum(),
            "user_purchases": history["purchases"].cumsum(),
        }
    )
    users["user_purchase_rate"] = (users["user_purchases"] + 1) / (users["user_carts"] + 5)
    view_price = history["view_price_sum"].cumsum()
    users["user_avg_price"] = (view_price / users["user_views"]).where(users["user_views"] > 0)
    users.to_parquet(out / "user_features.parquet", index=False)

    # product_features: cumulative per product, price against the category's daily median.
    daily = (
        events.groupby(["product_id", "event_date"])
        .agg(
            category_id=("category_id", "max"),
            views=("is_view", "sum"),
            carts=("is_cart", "sum"),
            purchases=("is_purchase", "sum"),
            events=("is_view", "size"),
            price_sum=("price", "sum"),
        )
        .reset_index()
        .rename(columns={"event_date": "activity_date"})
        .sort_values(["product_id", "activity_date"])
    )
    history = daily.groupby("product_id", sort=False)
    products = pd.DataFrame(
        {
            "product_id": daily["product_id"],
            "category_id": daily["category_id"],
            "activity_date": daily["activity_date"],
            "valid_from": (daily["activity_date"] + one_day).astype(date_type),
            "valid_to": (history["activity_date"].shift(-1) + one_day).astype(date_type),
            "product_views": history["views"].cumsum(),
            "product_carts": history["carts"].cumsum(),
            "product_purchases": history["purchases"].cumsum(),
        }
    )
    products["product_conversion_rate"] = (products["product_purchases"] + 1) / (
        products["product_carts"] + 5
    )
    products["product_avg_price"] = history["price_sum"].cumsum() / history["events"].cumsum()
    median = products.groupby(["category_id", "activity_date"])["product_avg_price"].transform(
        "median"
    )
    products["product_price_vs_category"] = (products["product_avg_price"] / median).where(
        median > 0, np.nan
    )
    products.to_parquet(out / "product_features.parquet", index=False)
    del events, daily, history

    # training_set: mature carts, features as of the event's day (greatest valid_from <=
    # event_date); the holdout is the last days of the mature carts.
    timeout = pd.Timedelta(seconds=SESSION_TIMEOUT_SECONDS)
    carts = carts[carts["user_session"].map(session_end) + timeout <= closed_at]
    last_date = carts["event_date"].max()
    carts = carts.assign(
        split=np.where(
            carts["event_date"] > last_date - pd.Timedelta(days=HOLDOUT_DAYS), "test", "train"
        )
    ).sort_values("event_date")
    user_columns = [
        "user_sessions",
        "user_views",
        "user_carts",
        "user_purchases",
        "user_purchase_rate",
        "user_avg_price",
    ]
    product_columns = [
        "product_views",
        "product_carts",
        "product_purchases",
        "product_conversion_rate",
        "product_avg_price",
        "product_price_vs_category",
    ]
    training = pd.merge_asof(
        carts,
        users[["user_id", "valid_from", *user_columns]]
        .rename(columns={"valid_from": "user_features_valid_from"})
        .sort_values("user_features_valid_from"),
        left_on="event_date",
        right_on="user_features_valid_from",
        by="user_id",
        direction="backward",
    )
    training = pd.merge_asof(
        training,
        products[["product_id", "valid_from", *product_columns]]
        .rename(columns={"valid_from": "product_features_valid_from"})
        .sort_values("product_features_valid_from"),
        left_on="event_date",
        right_on="product_features_valid_from",
        by="product_id",
        direction="backward",
    )
    training.to_parquet(out / "training_set.parquet", index=False)
    return len(training)


# ---- checking that both paths produced the same thing --------------------------------------------
def check_outputs(layout: Layout) -> dict[str, int]:
    """Row counts of silver and of each gold table, then silver row for row and the training set
    column for column (floats to a relative 1e-9): any difference stops the benchmark."""
    import duckdb

    con = duckdb.connect(str(layout.warehouse), read_only=True)
    project_silver = (
        f"read_parquet('{layout.base}/lake/silver/events/*/*.parquet', hive_partitioning = true)"
    )
    pandas_silver = f"read_parquet('{layout.pandas_silver}/*/*.parquet', hive_partitioning = true)"
    counts: dict[str, int] = {}
    problems: list[str] = []

    def count(relation: str) -> int:
        row = con.sql(f"select count(*) from {relation}").fetchone()
        return int(row[0]) if row else -1

    for name, project, pandas in [
        ("silver", project_silver, pandas_silver),
        *((t, t, f"read_parquet('{layout.pandas_gold / t}.parquet')") for t in GOLD),
    ]:
        counts[name] = count(project)
        if count(pandas) != counts[name]:
            problems.append(f"{name}: {counts[name]:,} rows (project), {count(pandas):,} (pandas)")

    silver_diff = count(
        f"""(select p.event_id from {project_silver} p full join {pandas_silver} q using (event_id)
        where p.session_seq is distinct from q.session_seq
           or cast(p.event_date as date) is distinct from cast(q.event_date as date)
           or p.user_session is distinct from q.user_session)"""
    )
    if silver_diff:
        problems.append(f"silver: {silver_diff:,} events differ in session_seq or event_date")

    # Numbers compared as numbers (pandas turns an integer column with a missing value into
    # floats), to a relative 1e-9; dates as dates; the rest as text.
    relation = con.sql("select * from training_set limit 0")
    for column, dtype in zip(relation.columns, relation.dtypes, strict=True):
        kind = str(dtype)
        if column == "event_id":
            continue
        if kind in ("DOUBLE", "BIGINT", "INTEGER"):
            differs = f"""(p.{column} is null) <> (q.{column} is null)
                or abs(p.{column} - q.{column}) > 1e-9 * greatest(abs(p.{column}), 1)"""
        elif kind == "DATE":
            differs = f"p.{column} is distinct from cast(q.{column} as date)"
        else:
            differs = f"cast(p.{column} as varchar) is distinct from cast(q.{column} as varchar)"
        bad = count(
            f"""(select event_id from training_set p
            full join read_parquet('{layout.pandas_gold}/training_set.parquet') q using (event_id)
            where {differs})"""
        )
        if bad:
            problems.append(f"training_set.{column}: {bad:,} rows differ")
    if problems:
        raise SystemExit("the two paths disagree:\n  " + "\n  ".join(problems))
    counts["training_set columns compared"] = len(relation.columns)
    return counts


# ---- running the stages --------------------------------------------------------------------------
@dataclass
class Stage:
    name: str
    seconds: float
    peak_mb: float
    note: str = ""


# Linux carries a process's peak RSS across fork and exec into the new program's ru_maxrss, so a
# stage started from this process (whose peak grew while it generated bronze or compared the
# outputs) would report at least that peak. A small launcher starts the stage instead and reports
# the stage's own wall time and ru_maxrss (KiB on Linux).
LAUNCHER = """\
import os, subprocess, sys, time
started = time.monotonic()
process = subprocess.Popen(sys.argv[2:])
_, status, usage = os.wait4(process.pid, 0)
with open(sys.argv[1], "w") as out:
    out.write(f"{time.monotonic() - started} {usage.ru_maxrss}")
sys.exit(os.waitstatus_to_exitcode(status))
"""


def run_stage(layout: Layout, name: str) -> Stage:
    """One stage in a fresh process: its wall time and its peak RSS (ru_maxrss of that process,
    from wait4, so it covers native allocations that tracemalloc would not see)."""
    if name == "project-gold":
        command, env = dbt_command(layout)
    else:
        command = [sys.executable, __file__, "--stage", name, "--base", str(layout.base)]
        env = dict(os.environ)
    log = layout.run / f"{name}.log"
    figures = layout.run / f"{name}.usage"
    with log.open("w") as out:
        returncode = subprocess.run(
            [sys.executable, "-c", LAUNCHER, str(figures), *command],
            env=env,
            cwd=layout.run,
            stdout=out,
            stderr=out,
            check=False,
        ).returncode
    if returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        raise SystemExit(f"stage {name} failed (exit {returncode}), see {log}:\n{tail}")
    seconds, maxrss_kib = figures.read_text().split()
    note = dbt_model_seconds(layout) if name == "project-gold" else ""
    return Stage(name, float(seconds), int(maxrss_kib) / 1024, note)


def dbt_model_seconds(layout: Layout) -> str:
    """How much of dbt's wall time executing its models took (run_results.json), the rest being
    dbt's own start, parsing and compilation."""
    results = json.loads((layout.run / "dbt" / "target" / "run_results.json").read_text())
    return f"executing the models took {results['elapsed_time']:.1f} s of the gold stage's time"


def child(stage: str, layout: Layout) -> int:
    functions = {
        "project-silver": project_silver,
        "pandas-silver": pandas_silver,
        "pandas-gold": pandas_gold,
    }
    rows = functions[stage](layout)
    say(f"{stage}: {rows:,} rows")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=GOAL_EVENTS)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--chunk", type=int, default=500_000, help="events per bronze landing")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved; the best is kept")
    parser.add_argument(
        "--project-only",
        action="store_true",
        help="the project's path alone: no pandas, no ratio (for sizes where pandas would not "
        "fit in memory: it peaks at ~7.7 GB at 10M events)",
    )
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--base", help=argparse.SUPPRESS)
    report.add_arguments(parser)
    args = parser.parse_args()
    report.apply_quick(parser, args, events=500_000)
    if args.project_only and args.json:
        parser.error("--json reports ratios against pandas, which --project-only leaves out")
    if args.stage:
        return child(args.stage, Layout(Path(args.base)))

    layout = Layout(ROOT / ".easymlops" / "bench" / f"lakehouse-{args.events}-seed{args.seed}")
    if layout.complete.exists() and (layout.bronze / "_delta_log").exists():
        bronze_rows = json.loads(layout.complete.read_text())["rows"]
        say(f"bronze: cached, {bronze_rows:,} rows in {layout.bronze} (delete it to regenerate)")
    else:
        say(f"bronze: generating {args.events:,} events into {layout.bronze} ...")
        started = time.monotonic()
        bronze_rows = generate_bronze(layout, args.events, args.seed, args.chunk)
        say(f"  {bronze_rows:,} rows landed in {time.monotonic() - started:.0f} s")

    # Rounds interleave the paths, so a noisy neighbour (2 shared cores) slows them alike.
    paths = {"project": PATHS["project"]} if args.project_only else PATHS
    runs: dict[str, list[list[Stage]]] = {path: [] for path in paths}
    for r in range(args.rounds):
        shutil.rmtree(layout.run, ignore_errors=True)
        shutil.rmtree(layout.base / "lake" / "silver", ignore_errors=True)
        layout.run.mkdir(parents=True)
        for path, stages in paths.items():
            say(f"round {r + 1}, {path}:")
            results = []
            for name in stages:
                if name == "project-gold":
                    prepare_dbt_parse(layout)
                stage = run_stage(layout, name)
                say(f"  {name:<15} {stage.seconds:7.1f} s  peak {stage.peak_mb:7,.0f} MB")
                results.append(stage)
            runs[path].append(results)
        if not args.project_only:
            say("checking that both paths produced the same rows ...")
            counts = check_outputs(layout)
            say("  equal: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))

    best = {
        path: min(rounds, key=lambda s: sum(x.seconds for x in s)) for path, rounds in runs.items()
    }
    say("")
    say(
        f"{bronze_rows:,} bronze rows ({args.events:,} events + replays), {DAYS} days, "
        f"best of {args.rounds} round(s); wall time per stage process, imports included"
    )
    say(f"{'':<10}{'silver s':>10}{'gold s':>10}{'total s':>10}{'rows/s':>12}{'peak MB':>10}")
    rate, peak = {}, {}
    for path, (silver, gold) in best.items():
        total = silver.seconds + gold.seconds
        rate[path] = bronze_rows / total
        peak[path] = max(silver.peak_mb, gold.peak_mb)
        say(
            f"{path:<10}{silver.seconds:>10.1f}{gold.seconds:>10.1f}{total:>10.1f}"
            f"{rate[path]:>12,.0f}{peak[path]:>10,.0f}"
        )
    say(f"dbt: {best['project'][1].note}")
    if args.project_only:
        return 0
    say(
        f"ratio project / pandas: rows/s {rate['project'] / rate['pandas']:.2f}, "
        f"peak memory {peak['project'] / peak['pandas']:.2f}"
    )
    goal_size = f"set for {GOAL_EVENTS:,} events"
    report.write(
        args.json,
        "lakehouse",
        [
            report.Figure(
                f"bronze -> silver -> gold, project ({args.events:,} events)",
                rate["project"],
                "rows/s",
                report.Baseline("pandas, same transforms", rate["pandas"]),
                goal=report.Goal("ratio", ">=", GOAL_RATE, goal_size),
            ),
            report.Figure(
                f"peak memory, project ({args.events:,} events)",
                peak["project"],
                "MB",
                report.Baseline("pandas, same transforms", peak["pandas"]),
                goal=report.Goal("ratio", "<=", GOAL_MEMORY, goal_size),
            ),
        ],
        quick=args.quick,
        details={
            "bronze_rows": bronze_rows,
            "rounds": args.rounds,
            "stages": {
                path: {s.name: {"seconds": s.seconds, "peak_mb": s.peak_mb} for s in stages}
                for path, stages in best.items()
            },
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
