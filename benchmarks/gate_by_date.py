"""How often a model of the generator's data clears the promotion gate, over consecutive start
dates: the generator's sessions depend on the dates they fall on (easymlops.generator), so one
run's verdict is one draw. For each first day: generated events (1% invalid, dropped as the
validator drops them) as silver Parquet, the real dbt project up to training_set, an XGBoost
model with fixed parameters (rounds early-stopped on the validation day, as the tuned model's
are), the price-only baseline and the oracle, judged by `easymlops.promotion.decide` (the gate
with the settings' margins). Prints each day's held-out carts, AUCs and lift interval, then how
many days cleared the gate and the lowest lower bound of the lift.

Needs no running stack (dbt on DuckDB in a temporary directory, no MLflow). Tuning is left out,
so the figures are those of one reasonable configuration, not of the pipeline's tuned model.

    python benchmarks/gate_by_date.py --events 20000 --days 5 --seed 11 \
        --first 2026-11-10 --count 20
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Iterator
from datetime import date, timedelta
from pathlib import Path

from easymlops import gate, promotion, training, truth
from easymlops.generator import generate_payloads
from easymlops.lake import write_silver_parquet
from easymlops.schema import Event, ValidationError, validate_bytes
from easymlops.settings import get_settings
from easymlops.warehouse import DBT_PROJECT_DIR, dbt_env, dbt_vars

PARAMS = {
    "objective": "binary:logistic",
    "eval_metric": "auc",
    "max_depth": 4,
    "eta": 0.05,
    "min_child_weight": 5,
    "nthread": 2,
    "seed": 1,
}


def valid_events(payloads: Iterable[bytes]) -> Iterator[Event]:
    """The payloads the validator accepts (the invalid 1% are dropped, as it dead-letters them)."""
    for payload in payloads:
        try:
            yield validate_bytes(payload)
        except ValidationError:
            continue


def verdict(args: argparse.Namespace, first: date, base: Path) -> tuple[gate.GateDecision, int]:
    """The gate's decision on the data starting `first`, and its number of held-out rows."""
    settings = get_settings().model_copy(
        update={
            "home": base,
            "lake_uri": str(base / "lake"),
            "warehouse_path": str(base / "warehouse.duckdb"),
            "warehouse_backend": "duckdb",
            "model_name": "gate_by_date",
        }
    )
    recorder = truth.TruthRecorder()
    payloads = generate_payloads(
        args.events,
        days=args.days,
        seed=args.seed,
        start=first,
        invalid_ratio=0.01,
        truth=recorder,
    )
    write_silver_parquet(base / "lake", valid_events(payloads))
    recorder.write(settings, settings.model_name)
    # The dbt CLI in a subprocess, as Dagster runs it; artifacts stay in the temporary directory.
    dbt = Path(sys.executable).with_name("dbt")
    command = [str(dbt), "run", "--select", "+training_set", "--vars", dbt_vars(settings)]
    command += ["--project-dir", str(DBT_PROJECT_DIR), "--profiles-dir", str(DBT_PROJECT_DIR)]
    command += ["--target", "duckdb", "--target-path", str(base / "target")]
    command += ["--log-path", str(base / "logs")]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EASYMLOPS_")}
    proc = subprocess.run(
        command, env=env | dbt_env(settings), cwd=base, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"dbt failed for {first}:\n{proc.stdout[-3000:]}")
    data = training.load_training_data(settings)
    fit_rows, valid_rows = data.fit_and_validation(settings.validation_days)
    rounds = training.fit_early_stopped(fit_rows, valid_rows, PARAMS, training.MODEL_FEATURES)
    model = training.fit(data.train, PARAMS, rounds)
    oracle, _ = training.oracle_scores(settings, data.test)
    decision = promotion.decide(
        settings,
        training.labels(data.test),
        training.predict(model, data.test),
        training.predict(training.baseline_model(data, settings), data.test),
        champion=None,
        oracle=oracle,
    )
    return decision, data.test.height


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=50_000)
    parser.add_argument("--days", type=int, default=7)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--first", type=date.fromisoformat, default=date(2026, 11, 15))
    parser.add_argument("--count", type=int, default=12, help="consecutive first days")
    args = parser.parse_args()
    print(f"{args.events:,} events over {args.days} days, seed {args.seed}, 1% invalid")
    cleared, lowest = 0, float("inf")
    for k in range(args.count):
        first = args.first + timedelta(days=k)
        with tempfile.TemporaryDirectory(prefix="gate-by-date-") as tmp:
            decision, rows = verdict(args, first, Path(tmp))
        cleared += decision.passed
        lowest = min(lowest, decision.lift_over_baseline.low)
        auc = decision.challenger_auc
        print(
            f"first day {first}: {rows} held-out carts, AUC {auc.estimate:.4f} "
            f"[{auc.low:.4f}, {auc.high:.4f}], oracle {decision.oracle_auc:.4f}, "
            f"lift {decision.lift_over_baseline}: "
            + ("cleared" if decision.passed else decision.description),
            flush=True,
        )
    print(
        f"cleared the gate on {cleared} of {args.count} first days; lowest lower bound of the "
        f"lift {lowest:+.4f} (the gate asks for > {get_settings().gate_min_lift:+.4f})"
    )


if __name__ == "__main__":
    main()
