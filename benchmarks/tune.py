"""Hyper-parameter search: the same XGBoost trials through Ray Tune (trials side by side, ASHA
stopping the weak ones) and as a plain sequential loop of xgb.train with early stopping, in one
run. Prints each one's wall time and best validation AUC, and the ratio sequential/tune.

Data: the warehouse's training_set when `make demo` has built it (the training days; the last
one is the validation set), otherwise a synthetic classification set (say so in the output);
`--synthetic-rows N` forces the synthetic set of N rows. Needs no running stack: it starts a
private local Ray instance, whose start-up is printed but not counted (a Dagster run attaches
to the running head instead).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import report
from easymlops import tuning
from easymlops.features import LABEL, MODEL_FEATURES
from easymlops.settings import get_settings

SYNTHETIC_ROWS = 20_000
SYNTHETIC_SEED = 11


@dataclass
class Dataset:
    fit_x: np.ndarray
    fit_y: np.ndarray
    valid_x: np.ndarray
    valid_y: np.ndarray
    feature_names: list[str]
    description: str


def say(message: str) -> None:
    print(message, flush=True)


def warehouse_dataset(path: Path) -> Dataset | None:
    """The training split of training_set, its last day as validation; None if there is none."""
    import duckdb

    if not path.exists():
        return None
    try:
        con = duckdb.connect(str(path), read_only=True)
    except duckdb.Error as exc:  # e.g. dbt holds the write lock right now
        say(f"note: cannot open {path}: {exc}")
        return None
    try:
        tables = {
            row[0]
            for row in con.execute("select table_name from information_schema.tables").fetchall()
        }
        if "training_set" not in tables:
            return None
        columns = {row[0] for row in con.execute("describe training_set").fetchall()}
        features = [name for name in MODEL_FEATURES if name in columns]
        missing = [name for name in MODEL_FEATURES if name not in columns]
        if missing:
            say(f"note: training_set lacks {', '.join(missing)}; using the other features")
        selected = ", ".join(f"cast({name} as double)" for name in features)
        # A total order, as training uses: row order must not depend on DuckDB's scan.
        rows = con.execute(
            f"select event_date, {LABEL}, {selected} from training_set "
            "where split = 'train' order by event_time, event_id"
        ).fetchall()
    finally:
        con.close()
    if not rows:
        return None
    dates = np.array([row[0] for row in rows])
    labels = np.array([int(row[1]) for row in rows])
    values = np.array([[np.nan if v is None else v for v in row[2:]] for row in rows], dtype=float)
    last = dates.max()
    valid = dates == last
    if valid.all() or len(np.unique(labels[valid])) < 2:
        return None
    return Dataset(
        fit_x=values[~valid],
        fit_y=labels[~valid],
        valid_x=values[valid],
        valid_y=labels[valid],
        feature_names=features,
        description=(
            f"warehouse training_set ({path}): {(~valid).sum():,} fit rows "
            f"({dates[~valid].min()}..{dates[~valid].max()}), {valid.sum():,} validation rows "
            f"({last}), {len(features)} features, {labels.mean():.1%} positive"
        ),
    )


def synthetic_dataset(rows: int, reason: str) -> Dataset:
    from sklearn.datasets import make_classification

    x, y = make_classification(
        n_samples=rows,
        n_features=20,
        n_informative=8,
        n_redundant=4,
        weights=[0.65],
        flip_y=0.05,
        class_sep=0.8,
        random_state=SYNTHETIC_SEED,
    )
    cut = int(rows * 0.8)
    return Dataset(
        fit_x=x[:cut],
        fit_y=y[:cut],
        valid_x=x[cut:],
        valid_y=y[cut:],
        feature_names=[f"x{i:02d}" for i in range(x.shape[1])],
        description=(
            f"SYNTHETIC ({reason}): sklearn make_classification, {cut:,} fit rows, "
            f"{rows - cut:,} validation rows, 20 features, {y.mean():.1%} positive, "
            f"seed {SYNTHETIC_SEED}"
        ),
    )


def summary(result: tuning.SearchResult) -> str:
    counts = {status: 0 for status in (tuning.TERMINATED, tuning.STOPPED, tuning.ERROR)}
    for trial in result.trials:
        counts[trial.status] += 1
    rounds = sum(len(trial.history) for trial in result.trials)
    return (
        f"{len(result.trials)} trials: {counts[tuning.TERMINATED]} ran to their end, "
        f"{counts[tuning.STOPPED]} stopped early, {counts[tuning.ERROR]} failed; "
        f"{rounds:,} rounds trained"
    )


def main() -> int:
    settings = get_settings()
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=settings.tune_trials)
    parser.add_argument("--concurrency", type=int, default=settings.tune_concurrency)
    parser.add_argument("--threads-per-trial", type=int, default=settings.tune_threads_per_trial)
    parser.add_argument("--seed", type=int, default=settings.tune_seed)
    parser.add_argument("--budget", type=float, default=settings.tune_time_budget_seconds)
    parser.add_argument("--max-rounds", type=int, default=400)
    parser.add_argument("--early-stopping-rounds", type=int, default=30)
    parser.add_argument(
        "--synthetic-rows", type=int, default=0, help="use a synthetic set of this many rows"
    )
    parser.add_argument("--progress", action="store_true", help="print a line per trial")
    # The full search on the demo's warehouse takes well under a minute: --quick changes nothing.
    report.add_arguments(parser)
    args = parser.parse_args()

    if args.synthetic_rows:
        data = synthetic_dataset(args.synthetic_rows, "--synthetic-rows")
    else:
        found = warehouse_dataset(settings.warehouse)
        data = found or synthetic_dataset(
            SYNTHETIC_ROWS,
            f"no training_set in {settings.warehouse}; run `make demo` for real data",
        )
    say(f"data: {data.description}")
    say(
        f"search: {args.trials} trials (seed {args.seed}), at most {args.max_rounds} rounds, "
        f"early stopping {args.early_stopping_rounds}; tune: {args.concurrency} trials at once "
        f"x {args.threads_per_trial} thread(s), ASHA; budget {args.budget:.0f} s each"
    )
    common: dict[str, Any] = dict(
        feature_names=data.feature_names,
        trials=args.trials,
        time_budget_s=args.budget,
        threads_per_trial=args.threads_per_trial,
        seed=args.seed,
        max_rounds=args.max_rounds,
        early_stopping_rounds=args.early_stopping_rounds,
        progress=say if args.progress else None,
    )
    arrays = (data.fit_x, data.fit_y, data.valid_x, data.valid_y)

    started = time.monotonic()
    tuning.attach_ray(None)
    say(f"ray start (local instance, not counted)  {time.monotonic() - started:6.1f} s")

    sequential = tuning.sequential_search(*arrays, **common)
    tune = tuning.search(*arrays, concurrency=args.concurrency, **common)

    rows = (
        (f"sequential ({args.threads_per_trial} thread, no Ray)", sequential),
        (f"tune ({args.concurrency} x {args.threads_per_trial} thread, ASHA)", tune),
    )
    for name, result in rows:
        say(
            f"{name:<38} wall {result.wall_seconds:7.1f} s  best valid AUC "
            f"{result.best_valid_auc:.4f} after {result.best_rounds} rounds  ({summary(result)})"
        )
    if tune.best_config == sequential.best_config:
        say("tune found the same best configuration as the sequential loop")
    else:
        say(
            "tune found another best configuration than the sequential loop (ASHA stopped a "
            "trial that would have won, or the budget ran out)"
        )
    say(f"speed-up sequential/tune  {sequential.wall_seconds / tune.wall_seconds:.2f}x")
    # As trials/s, so the ratio tune/sequential is the speed-up printed above.
    report.write(
        args.json,
        "tune",
        [
            report.Figure(
                f"search throughput, Ray Tune ({args.concurrency} at once, ASHA)",
                args.trials / tune.wall_seconds,
                "trials/s",
                report.Baseline(
                    "the same trials in a sequential loop", args.trials / sequential.wall_seconds
                ),
            )
        ],
        quick=args.quick,
        details={
            "data": data.description,
            "tune_wall_s": tune.wall_seconds,
            "sequential_wall_s": sequential.wall_seconds,
            "tune_best_valid_auc": tune.best_valid_auc,
            "sequential_best_valid_auc": sequential.best_valid_auc,
            "same_best_config": tune.best_config == sequential.best_config,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
