"""Monitoring stages against baselines measured in the same run (needs `make demo` first: its
warehouse, lake, champion and broker):

1. Batch scoring (`serving.batch.score_day`, serving's own per-cart feature code: Redis-format
   hashes, session fields, `assemble_row`) in carts/s, against the vectorized baseline: the same
   day's training_set rows (features already joined by dbt) through the same booster. Before
   timing, the probabilities of the carts both have are compared (1e-6): a fast wrong path
   would not count.
2. Prediction logging (`serving.prediction_log.PredictionLog.send`, what each /predict call
   adds) in records/s, against encoding the same records to JSON alone (the floor any logging
   pays), then flushed to the broker and counted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import polars as pl

from benchmarks import report
from easymlops import training
from easymlops.features import MODEL_FEATURES
from easymlops.settings import get_settings
from easymlops.warehouse import connect


def best_of(rounds: int, run: object) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()  # type: ignore[operator]
        times.append(time.perf_counter() - started)
    return min(times)


def bench_batch(rounds: int, figures: list[report.Figure]) -> int:
    from serving.batch import load_champion, score_day

    settings = get_settings()
    if settings.warehouse_backend != "duckdb":
        print(
            "the monitoring benchmark reads the embedded DuckDB warehouse of `make demo`: unset "
            f"EASYMLOPS_WAREHOUSE_BACKEND (it is {settings.warehouse_backend!r})",
            file=sys.stderr,
        )
        return 1
    model = load_champion(settings)
    with connect(settings) as con:
        row = con.execute(
            "select max(event_date) from training_set where split = 'test'"
        ).fetchone()
        if row is None or row[0] is None:
            print("no test split in the warehouse: run `make demo` first", file=sys.stderr)
            return 1
        day = row[0]
        offline = con.execute(
            f"select event_id, {', '.join(MODEL_FEATURES)} from training_set where event_date = ?",
            [day],
        ).pl()
    scores = score_day(settings, day, model)
    both = scores.join(
        offline.with_columns(pl.Series("offline", training.predict(model.booster, offline))).select(
            "event_id", "offline"
        ),
        on="event_id",
    )
    worst = float((both["probability"] - both["offline"]).abs().max() or 0.0)
    if both.is_empty() or worst > 1e-6:
        print(
            f"batch scores differ from the offline ones (max {worst}): no figure", file=sys.stderr
        )
        return 1
    batch = best_of(rounds, lambda: score_day(settings, day, model))
    base = best_of(rounds, lambda: training.predict(model.booster, offline))
    print(f"batch scoring {day}: {scores.height} carts, {both.height} equal to training_set's")
    print(f"  serving's feature code  {scores.height / batch:>10,.0f} carts/s ({batch:.3f} s)")
    print(f"  vectorized baseline     {offline.height / base:>10,.0f} carts/s ({base:.3f} s)")
    ratio = (scores.height / batch) / (offline.height / base)
    print(f"  ratio serving code / vectorized throughput: {ratio:.3f}")
    figures.append(
        report.Figure(
            "batch scoring, serving's per-cart feature code",
            scores.height / batch,
            "carts/s",
            report.Baseline(
                "the same booster on training_set's rows, vectorized", offline.height / base
            ),
        )
    )
    return 0


def bench_prediction_log(records: int, figures: list[report.Figure]) -> int:
    from easymlops.kafka import end_offsets
    from serving.prediction_log import PredictionLog

    settings = get_settings()
    topic = settings.topic_predictions
    rng = np.random.default_rng(0)
    bodies = [
        {
            "request_id": uuid.uuid4().hex,
            "model_version": "1",
            "features": {name: float(rng.random()) for name in MODEL_FEATURES},
            "probability": float(rng.random()),
        }
        for _ in range(records)
    ]
    before = sum(end_offsets(settings, topic).values())
    started = time.perf_counter()
    for body in bodies:
        json.dumps(body, separators=(",", ":"), default=str).encode()
    encode = time.perf_counter() - started
    log = PredictionLog(settings.bootstrap_servers, topic, max_queued=records + 1)
    started = time.perf_counter()
    for body in bodies:
        log.send(body["request_id"], body)
    send = time.perf_counter() - started
    left = log.close(timeout=60)
    delivered = sum(end_offsets(settings, topic).values()) - before
    print(f"prediction log: {records} records, {delivered} on the topic, {left} undelivered")
    for name, seconds in (("send (queue + encode)", send), ("JSON encoding alone", encode)):
        print(
            f"  {name:<22}  {records / seconds:>10,.0f} records/s "
            f"({seconds / records * 1e6:.1f} us each)"
        )
    print(f"  ratio send / encode-only throughput: {encode / send:.3f}")
    figures.append(
        report.Figure(
            f"prediction log send ({delivered:,} of {records:,} on the topic)",
            records / send,
            "records/s",
            report.Baseline("JSON encoding alone", records / encode),
        )
    )
    return 0 if delivered == records and left == 0 else 1


def main() -> int:
    # Run as `python benchmarks/monitoring.py`, this directory comes first on sys.path, and its
    # serving.py (the latency benchmark) would hide the `serving` package.
    sys.path[0] = str(Path(__file__).resolve().parents[1])
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--records", type=int, default=100_000)
    report.add_arguments(parser)
    args = parser.parse_args()
    report.apply_quick(parser, args, rounds=2, records=20_000)
    figures: list[report.Figure] = []
    code = bench_batch(args.rounds, figures) or bench_prediction_log(args.records, figures)
    if code == 0:
        report.write(args.json, "monitoring", figures, quick=args.quick)
    return code


if __name__ == "__main__":
    sys.exit(main())
