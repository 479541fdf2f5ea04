"""What a Dagster run costs around its work, by executor, in one run of this script.

For each executor (`EASYMLOPS_DAGSTER_EXECUTOR`: spawn = Dagster's default, forkserver, in_process)
it runs, as `make backfill` and a user's CLI would, `dagster asset materialize` in a process of
its own and reads the run's event log:

- `noop` (benchmarks/dagster_noop.py: the platform's code location plus an asset that does
  nothing): wall time of the command, and the time from starting it to STEP_START, i.e. how long
  a one-asset materialization waits before its code runs;
- a one-date backfill of `--events` events (silver_events + the dbt gold models, the README's
  `make backfill` selection): wall time, and the work itself = the time during which at least one
  step was between STEP_START and its end. Overhead ratio = wall / work.

Before that it times loading the code location in a fresh interpreter (what every run and every
spawned step pays) and prints the figures as ratios against spawn, measured in the same run.

Needs the embedded stack's broker (`make up` or `make demo`): the events are produced to a topic
of their own and landed into a bronze table of their own with `lake.land_topic`; the lake,
warehouse and Dagster instance live under `.easymlops/bench/dagster/` and nothing of the demo's
data is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

from benchmarks import report

ROOT = Path(__file__).resolve().parent.parent
DAGSTER = Path(sys.executable).parent / "dagster"
EXECUTORS = ("spawn", "forkserver", "in_process")
BACKFILL_SELECT = "silver_events,group:warehouse"
LOAD_CODE = (
    "import time, resource; t = time.perf_counter()\n"
    "import easymlops_assets.definitions as d; d.defs()\n"
    "r = resource.getrusage(resource.RUSAGE_SELF)\n"
    "print(time.perf_counter() - t, r.ru_utime + r.ru_stime)\n"
)
# Goals (issue 15): the code location loads in <= 3 s, a one-asset run reaches its step in <= 3 s,
# the one-date backfill takes <= 20 s.
GOAL_LOAD_S = 3.0
GOAL_TO_STEP_S = 3.0
GOAL_BACKFILL_S = 20.0


def say(message: str) -> None:
    print(message, flush=True)


@dataclass
class RunFigures:
    wall: float  # command start to exit
    to_first_step: float  # command start to the first STEP_START
    work: float  # time during which at least one step ran
    steps: int


def load_time(env: dict[str, str]) -> tuple[float, float]:
    out = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", LOAD_CODE],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    ).stdout.split()
    return float(out[-2]), float(out[-1])


def prepare_bronze(env: dict[str, str], events: int, day: date) -> int:
    """Produce `events` validated events of `day` to a new topic, land them in bronze, and parse
    the dbt project for these settings."""
    os.environ.update(env)
    from confluent_kafka import KafkaException

    from easymlops import lake
    from easymlops.generator import generate_payloads
    from easymlops.kafka import KafkaUnavailable, ensure_topics
    from easymlops.produce import produce_payloads
    from easymlops.schema import validate_bytes
    from easymlops.settings import get_settings

    get_settings.cache_clear()
    settings = get_settings()
    try:
        ensure_topics(settings)
    except (KafkaUnavailable, KafkaException) as exc:
        sys.exit(
            f"no broker at {settings.bootstrap_servers}: start the stack first (make up): {exc}"
        )
    values = [
        validate_bytes(p).to_json_bytes()
        for p in generate_payloads(events, days=1, seed=7, start=day)
    ]
    produce_payloads(settings, values, topic=settings.topic_validated)
    landed = lake.land_topic(
        settings, settings.topic_validated, lake.bronze_path(settings, "events"), "validated"
    )
    # As `make backfill` does (its `manifest` prerequisite): the dbt parse the runs reuse is made
    # with their settings, here this benchmark's lake and warehouse.
    from easymlops.warehouse import prepare_manifest

    prepare_manifest(settings)
    return landed.rows


def materialize(env: dict[str, str], args: list[str]) -> RunFigures:
    import dagster as dg

    started = time.time()
    proc = subprocess.run(
        [str(DAGSTER), "asset", "materialize", *args],
        env=env,
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    wall = time.time() - started
    if proc.returncode != 0:
        sys.exit(f"dagster asset materialize {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    with dg.DagsterInstance.from_config(env["DAGSTER_HOME"]) as instance:
        [record] = instance.get_run_records(limit=1)
        starts: dict[str, float] = {}
        intervals: list[tuple[float, float]] = []
        for entry in instance.all_logs(record.dagster_run.run_id):
            event = entry.dagster_event
            if event is None or entry.step_key is None:
                continue
            if event.event_type == dg.DagsterEventType.STEP_START:
                starts[entry.step_key] = entry.timestamp
            elif event.event_type in (
                dg.DagsterEventType.STEP_SUCCESS,
                dg.DagsterEventType.STEP_FAILURE,
            ):
                intervals.append((starts[entry.step_key], entry.timestamp))
    if not intervals:
        sys.exit(f"no step ran in {' '.join(args)}")
    return RunFigures(
        wall=wall,
        to_first_step=min(starts.values()) - started,
        work=union_length(intervals),
        steps=len(intervals),
    )


def union_length(intervals: list[tuple[float, float]]) -> float:
    total, reached = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reached:
            total += end - max(start, reached)
            reached = end
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1000)
    parser.add_argument(
        "--executors", default=",".join(EXECUTORS), help="comma-separated, spawn first"
    )
    report.add_arguments(parser)
    args = parser.parse_args()
    # Quick: the executor the platform uses on one machine, without the spawn baseline.
    report.apply_quick(parser, args, executors="in_process")
    executors = args.executors.split(",")

    base = ROOT / ".easymlops" / "bench" / "dagster"
    shutil.rmtree(base, ignore_errors=True)
    (base / "dagster").mkdir(parents=True)
    (base / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    day = datetime.now(UTC).date() - timedelta(days=1)
    env = {
        **os.environ,
        "DAGSTER_HOME": str(base / "dagster"),
        "EASYMLOPS_LAKE_URI": str(base / "lake"),
        "EASYMLOPS_WAREHOUSE_PATH": str(base / "warehouse.duckdb"),
        "EASYMLOPS_TOPIC_VALIDATED": f"bench.dagster.validated.{uuid.uuid4().hex[:8]}",
        "PYTHONWARNINGS": "ignore",
    }

    load_wall, load_cpu = load_time(env)
    say(f"code location load (fresh interpreter): {load_wall:.2f} s wall, {load_cpu:.2f} s CPU")
    rows = prepare_bronze(env, args.events, day)
    say(f"bronze: {rows} events of {day} landed")

    results: dict[str, dict[str, RunFigures]] = {}
    for kind in executors:
        run_env = {**env, "EASYMLOPS_DAGSTER_EXECUTOR": kind}
        say(f"[{kind}] noop ...")
        noop = materialize(
            run_env, ["-f", str(ROOT / "benchmarks" / "dagster_noop.py"), "--select", "noop"]
        )
        say(f"[{kind}] one-date backfill ...")
        backfill = materialize(
            run_env,
            [
                "-m",
                "easymlops_assets.definitions",
                "--select",
                BACKFILL_SELECT,
                "--partition",
                str(day),
            ],
        )
        results[kind] = {"noop": noop, "backfill": backfill}

    say("")
    say(
        f"{'executor':<11} {'noop wall':>10} {'to step':>8} {'backfill':>9} {'work':>6} "
        f"{'overhead':>9} {'steps':>5}"
    )
    for kind, figures in results.items():
        noop, backfill = figures["noop"], figures["backfill"]
        say(
            f"{kind:<11} {noop.wall:>9.1f}s {noop.to_first_step:>7.1f}s {backfill.wall:>8.1f}s "
            f"{backfill.work:>5.1f}s {backfill.wall / backfill.work:>8.1f}x {backfill.steps:>5}"
        )
    if "spawn" in results:
        say("")
        base_figures = results["spawn"]
        for kind, figures in results.items():
            if kind == "spawn":
                continue
            say(
                f"{kind} / spawn: noop {figures['noop'].wall / base_figures['noop'].wall:.2f}, "
                f"one-date backfill "
                f"{figures['backfill'].wall / base_figures['backfill'].wall:.2f}"
            )
    record = [
        report.Figure(
            "code location load, fresh interpreter",
            load_wall,
            "s",
            goal=report.Goal("value", "<=", GOAL_LOAD_S),
        )
    ]
    for kind, figures_of in results.items():
        noop, backfill = figures_of["noop"], figures_of["backfill"]
        spawn = results.get("spawn")
        record += [
            report.Figure(
                f"no-op asset, command start to STEP_START ({kind})",
                noop.to_first_step,
                "s",
                # Without spawn in the run, the floor is loading the code location once.
                report.Baseline("spawn, same run", spawn["noop"].to_first_step)
                if spawn and kind != "spawn"
                else report.Baseline("code location load", load_wall),
                goal=report.Goal("value", "<=", GOAL_TO_STEP_S),
            ),
            report.Figure(
                f"one-date backfill of {rows:,} events, wall ({kind})",
                backfill.wall,
                "s",
                report.Baseline("spawn, same run", spawn["backfill"].wall)
                if spawn and kind != "spawn"
                else report.Baseline("its work: time a step ran", backfill.work),
                goal=report.Goal("value", "<=", GOAL_BACKFILL_S),
            ),
        ]
    report.write(
        args.json,
        "dagster_runs",
        record,
        quick=args.quick,
        details={
            "events": rows,
            "load_wall_s": load_wall,
            "load_cpu_s": load_cpu,
            "runs": {k: {n: vars(f) for n, f in v.items()} for k, v in results.items()},
        },
    )


if __name__ == "__main__":
    main()
