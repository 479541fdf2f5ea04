"""`easymlops demo`: every stage built so far, end to end, with a summary a person can read."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import date
from typing import Any

import httpx
import redis
from rich.console import Console
from rich.table import Table

from easymlops import registry
from easymlops.features import session_key
from easymlops.pipeline import GATE_CHECK, NotEnoughData, PipelineResult, run_pipeline
from easymlops.settings import Settings, get_settings


def sample_requests(settings: Settings, n: int) -> list[dict[str, Any]]:
    """Real cart events from the held-out period, as prediction requests."""
    from easymlops.warehouse import query

    rows = query(
        settings,
        """select user_id, product_id, user_session, price, event_time, event_id
        from training_set where split = 'test' order by event_time, event_id limit ?""",
        [n],
    )
    # Each request carries the cart's time and id, as a live cart event would: serving then
    # uses the session's events strictly before it, as the training row did.
    return [
        {
            "user_id": u,
            "product_id": p,
            "user_session": s,
            "price": float(price),
            "event_time": time.isoformat() + ("" if time.tzinfo else "Z"),
            "event_id": event_id,
        }
        for u, p, s, price, time, event_id in rows
    ]


def time_predictions(settings: Settings, requests: list[dict[str, Any]]) -> dict[str, Any]:
    """Sequential requests over one keep-alive connection: latency as a client sees it."""
    latencies: list[float] = []
    probabilities: list[float] = []
    version = ""
    with httpx.Client(
        base_url=settings.serve_url, timeout=10, headers=settings.serve_headers
    ) as client:
        for body in requests:
            started = time.perf_counter()
            response = client.post("/predict", json=body)
            latencies.append((time.perf_counter() - started) * 1000)
            response.raise_for_status()
            payload = response.json()
            probabilities.append(payload["probability"])
            version = str(payload["model_version"])
    latencies.sort()
    return {
        "requests": len(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "mean_probability": statistics.fmean(probabilities),
        "model_version": version,
    }


def ensure_serving(settings: Settings, champion_version: str, console: Console) -> None:
    """Make sure Ray Serve answers with the champion: after a refused challenger this run did
    not deploy, and after `easymlops down` the Ray head (and the app on it) is new."""
    try:
        response = httpx.get(
            f"{settings.serve_url}/model", timeout=5, headers=settings.serve_headers
        )
        served = response.json() if response.status_code == 200 else {}
        if (served.get("name"), str(served.get("version"))) == (
            settings.model_name,
            champion_version,
        ):
            return
    except (httpx.HTTPError, ValueError):
        pass
    console.print(f"  deploying the champion (version {champion_version}) to Ray Serve")
    from serving.deploy import deploy

    deploy(settings, wait_ready=True)


def _live_sessions(settings: Settings) -> int:
    """Session-feature hashes the validator keeps in Redis (not their applied-id sets)."""
    client = redis.Redis.from_url(settings.redis)
    return sum(
        1
        for key in client.scan_iter(match=f"{session_key('*')}", count=10_000)
        if not key.endswith(b":applied")
    )


def materialize(
    settings: Settings, console: Console, first: date | None = None, last: date | None = None
) -> tuple[PipelineResult, registry.RegisteredModel | None] | None:
    """`run_pipeline` with its checks and the gate's outcome printed; None when it failed (the
    reason printed)."""
    try:
        result = run_pipeline(settings, first=first, last=last)
    except NotEnoughData as exc:
        console.print(f"[red]error:[/red] {exc}")
        return None
    if not report_checks(result, console):
        return None
    return result, report_gate(result, settings, console)


def report_checks(result: PipelineResult, console: Console) -> bool:
    """Print the checks' outcome; False when the run failed for another reason than a refusal
    by the promotion gate (the failures are printed)."""
    failed_checks = sorted(key for key, passed in result.checks.items() if not passed)
    console.print(
        f"  asset checks: {len(result.checks) - len(failed_checks)}/{len(result.checks)} passed"
    )
    for key in failed_checks:
        description = result.check_details[key][0]
        if key in result.warn_checks:
            console.print(f"  [yellow]check warned:[/yellow] {key}: {description}")
        else:
            console.print(f"  [red]check failed:[/red] {key}: {description}")
    if not result.success and not result.gate_refused:
        console.print(f"[red]Dagster run {result.run_id} failed:[/red]")
        for failure in result.failures:
            console.print(f"  {failure}")
        return False
    return True


def report_gate(
    result: PipelineResult, settings: Settings, console: Console
) -> registry.RegisteredModel | None:
    """Say what a refusal by the gate means for serving; returns the champion."""
    model = result.materializations.get("purchase_model", {})
    champion = registry.champion(settings)
    if result.gate_refused:
        gate_description = result.check_details.get(GATE_CHECK, ("", {}))[0]
        console.print(
            f"  [yellow]promotion gate refused version {model.get('model_version')}:"
            f"[/yellow] {gate_description}"
        )
        console.print(
            f"  version {champion.version} (champion) keeps serving"
            if champion
            else "  no version has passed the gate yet: nothing serves"
        )
    return champion


def add_pipeline_rows(
    table: Table, result: PipelineResult, champion: registry.RegisteredModel | None
) -> None:
    """The summary rows of a pipeline run (the demo's and `easymlops pipeline`'s)."""
    nan = float("nan")
    m = result.materializations
    model = m.get("purchase_model", {})
    gate = result.check_details.get(GATE_CHECK, ("", {}))[1]
    table.add_row("dates", f"{result.first_date}..{result.last_date}")
    table.add_row("bronze_events rows landed", f"{result.rows('bronze_events') or 0:,}")
    table.add_row("bronze_invalid_events rows", f"{result.rows('bronze_invalid_events') or 0:,}")
    silver_dates = result.partitions.get("silver_events", {})
    table.add_row(
        f"silver_events rows ({len(silver_dates)} daily partitions)",
        f"{result.rows('silver_events') or 0:,}",
    )
    for name in ("fct_cart_events", "user_features", "product_features", "training_set"):
        count = result.rows(name)
        table.add_row(f"{name} rows (dbt)", "?" if count is None else f"{count:,}")
    table.add_row(
        "online_features (users + products)",
        f"{m.get('online_features', {}).get('dagster/row_count', 0):,}",
    )
    table.add_row(
        "tuning (Ray Tune, ASHA)",
        f"{model.get('tune_trials', 0):.0f} trials ({model.get('tune_failed_trials', 0):.0f} "
        f"failed) in {model.get('tune_wall_seconds', nan):.0f} s, best validation AUC "
        f"{model.get('tune_best_valid_auc', nan):.4f}",
    )
    table.add_row(
        "held-out AUC (95% interval)",
        f"{model.get('test_auc', nan):.4f} [{model.get('test_auc_ci_low', nan):.4f}, "
        f"{model.get('test_auc_ci_high', nan):.4f}]",
    )
    table.add_row("price-only baseline AUC", f"{model.get('baseline_test_auc', nan):.4f}")
    if "oracle_test_auc" in model:
        table.add_row(
            "oracle AUC (true probabilities) / model ratio",
            f"{model['oracle_test_auc']:.4f} / {model['model_oracle_ratio']:.3f}",
        )
    else:
        table.add_row("oracle AUC", "not applicable (no ground truth)")
    if gate:
        verdict = "passed" if result.checks.get(GATE_CHECK) else "REFUSED"
        versus = gate.get("vs_champion", "n/a")
        table.add_row(
            "promotion gate",
            f"{verdict}: lift over baseline {gate.get('lift_over_baseline')}"
            + (
                f"; vs champion v{gate.get('champion_version')} {versus}" if versus != "n/a" else ""
            ),
        )
    table.add_row(
        "model trained",
        f"{model.get('model_name')} v{model.get('model_version')}"
        + (" (refused by the gate)" if result.gate_refused else ""),
    )
    table.add_row("serving", f"v{champion.version} (champion)" if champion else "nothing yet")
    drift_key = "feature_drift:features_not_drifted"
    if drift_key in result.check_details:
        days = sorted(result.partitions.get("feature_drift", {}))
        table.add_row(
            f"drift of new days vs the former champion ({', '.join(days)})",
            result.check_details[drift_key][0],
        )
    table.add_row("checks passed", f"{sum(result.checks.values())}/{len(result.checks)}")


def run_pipeline_command(
    *,
    console: Console,
    out: Console,
    first: date | None,
    last: date | None,
    predictions: int,
) -> int:
    """`easymlops pipeline`: the demo's stage 4 on whatever Kafka holds, with its summary."""
    from easymlops import stack

    settings = get_settings()
    started = time.monotonic()
    missing = [s.name for s in stack.status(settings) if s.state != "running"]
    if missing and not (settings.kafka_bootstrap and settings.mlflow_tracking_uri):
        console.print(f"[red]error:[/red] {', '.join(missing)} not running: `easymlops up` first")
        return 1
    console.rule("[bold]materialize the asset graph through Dagster")
    outcome = materialize(settings, console, first, last)
    if outcome is None:
        return 1
    result, champion = outcome
    table = Table(title="easymlops pipeline", show_header=True)
    table.add_column("stage")
    table.add_column("result", justify="right")
    add_pipeline_rows(table, result, champion)
    if champion is not None and predictions:
        ensure_serving(settings, champion.version, console)
        requests = sample_requests(settings, predictions)
        if requests:
            latency = time_predictions(settings, requests)
            table.add_row(
                "prediction latency p50 / p99",
                f"{latency['p50_ms']:.1f} ms / {latency['p99_ms']:.1f} ms",
            )
    table.add_row("wall time", f"{time.monotonic() - started:.0f} s")
    out.print(table)
    return 0


def run_demo(
    *,
    console: Console,
    out: Console,
    events: int,
    days: int,
    invalid_ratio: float,
    seed: int,
    predictions: int,
    produce: Callable[[], dict[str, Any]],
    validate: Callable[[], dict[str, Any]],
) -> int:
    from easymlops import stack

    settings = get_settings()
    if settings.warehouse_backend != "duckdb":
        # The demo starts the embedded stack and builds its own warehouse: a DuckDB file.
        console.print(
            "[red]error:[/red] the demo runs the embedded stack on DuckDB; unset "
            "EASYMLOPS_WAREHOUSE_BACKEND (it is "
            f"{settings.warehouse_backend!r}) or run `easymlops pipeline` against your stack"
        )
        return 1
    started = time.monotonic()
    timings: dict[str, float] = {}

    def step(name: str) -> None:
        console.rule(f"[bold]{name}")
        timings[name] = time.monotonic()

    step("1/5 stack up")
    try:
        stack.up(settings, progress=lambda msg: console.print(f"  {msg}"))
    except stack.StackError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1
    step(f"2/5 produce {events} events over {days} days")
    produced = produce()
    step("3/5 validate")
    validated = validate()
    step("4/5 materialize the asset graph through Dagster")
    outcome = materialize(settings, console)
    if outcome is None:
        return 1
    result, champion = outcome
    latency = None
    if champion is not None:
        step(f"5/5 {predictions} sequential predictions")
        ensure_serving(settings, champion.version, console)
        latency = time_predictions(settings, sample_requests(settings, predictions))

    table = Table(title="EasyMLOps demo", show_header=True)
    table.add_column("stage")
    table.add_column("result", justify="right")
    table.add_row("produced to events.raw", f"{produced['delivered']:,}")
    table.add_row("validated / dead-lettered", f"{validated['valid']:,} / {validated['invalid']:,}")
    table.add_row("validator throughput", f"{validated['events_per_second']:,.0f} events/s")
    table.add_row("live sessions in Redis (feat:session:*)", f"{_live_sessions(settings):,}")
    add_pipeline_rows(table, result, champion)
    if latency is not None:
        table.add_row(
            "prediction latency p50 / p99",
            f"{latency['p50_ms']:.1f} ms / {latency['p99_ms']:.1f} ms",
        )
    table.add_row("demo wall time", f"{time.monotonic() - started:.0f} s")
    out.print(table)
    out.print(
        "\nThe stack is still running:\n"
        f"  predictions  POST {settings.serve_url}/predict\n"
        f"  MLflow       {settings.mlflow_uri}\n"
        f"  Ray          http://{settings.host}:{settings.ray_dashboard_port}\n"
        f"  Dagster UI   make dev  (then http://{settings.host}:{settings.dagster_port})\n"
        "  stop it with `easymlops down` (or `make down`)"
    )
    return 0
