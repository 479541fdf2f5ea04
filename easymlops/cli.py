"""`easymlops`: run the embedded stack, produce and validate events, and run the demo."""

from __future__ import annotations

import json
import signal
import sys
from datetime import date
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from easymlops.settings import get_settings

app = typer.Typer(help=__doc__, no_args_is_help=True, add_completion=False)
console = Console(stderr=True)
out = Console()


def _fail(message: str) -> None:
    # Printed as is: no markup read in it (paths, lists in brackets) and no wrapping or cropping
    # of long words (a long path once swallowed the reason after it).
    console.print(f"[red]error:[/red] {escape(message)}", soft_wrap=True)
    raise typer.Exit(1)


def _progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        transient=False,
    )


@app.command()
def up(
    profile: Annotated[
        str | None,
        typer.Option(
            "--profile",
            help="embedded (broker, Redis, MLflow on SQLite, Ray) or production-local (Apache "
            "Kafka, PostgreSQL, S3, MLflow on PostgreSQL + S3, Redis, Ray, Dagster's code "
            "server, webserver and daemon); default EASYMLOPS_PROFILE.",
        ),
    ] = None,
    with_nginx: Annotated[
        bool,
        typer.Option(
            "--with-nginx", help="Also NGINX in front of Ray Serve on EASYMLOPS_NGINX_PORT."
        ),
    ] = False,
    with_flink: Annotated[
        bool,
        typer.Option(
            "--with-flink",
            help="Also a standalone Flink cluster (jobmanager + taskmanager; REST API and web UI "
            "on EASYMLOPS_FLINK_REST_PORT) to run flink_jobs/validation_job.py on.",
        ),
    ] = False,
) -> None:
    """Start the local stack of a profile (default: the embedded one); idempotent."""
    from easymlops import stack

    settings = get_settings()
    if profile is not None:
        if profile not in ("embedded", "production-local"):
            _fail(f"--profile: {profile!r} is not one of embedded, production-local")
        settings = settings.model_copy(update={"profile": profile})  # type: ignore[dict-item]
    extra = (["nginx"] if with_nginx else []) + (list(stack.FLINK) if with_flink else [])
    services = [*stack.profile_services(settings.profile), *extra] if extra else None
    try:
        statuses = stack.up(
            settings, services=services, progress=lambda msg: console.print(f"  {msg}")
        )
    except stack.StackError as exc:
        _fail(str(exc))
    for s in statuses:
        out.print(f"[green]{s.state:>8}[/green]  {s.name:<17} {s.url}")


@app.command()
def down() -> None:
    """Stop what `easymlops up` started in this home, whatever the profile, and this user's dbt
    fork server."""
    from easymlops import dbt_forkserver, stack

    stopped = stack.down(get_settings())
    # The fork server is the user's, shared by every home, so stopping it only ends its idle
    # wait (up to 300 s): a dbt command it runs finishes, and the next one starts a new server.
    try:
        if dbt_forkserver.stop_servers(dbt_forkserver.socket_dir()):
            stopped.append("dbt fork server")
    except dbt_forkserver.ForkServerUnavailable:
        pass  # no private directory, so no server of ours (easymlops-dbt runs dbt itself)
    out.print(f"stopped: {', '.join(stopped) if stopped else 'nothing was running'}")


@app.command()
def status(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show each service's URL and state."""
    from easymlops import stack

    statuses = stack.status(get_settings())
    if as_json:
        out.print_json(json.dumps([s.to_dict() for s in statuses]))
        return
    table = Table("service", "state", "url", "pid")
    for s in statuses:
        table.add_row(s.name, s.state, s.url, str(s.pid or ""))
    out.print(table)


@app.command()
def produce(
    events: Annotated[int, typer.Option(help="Number of synthetic events.", min=1)] = 50_000,
    days: Annotated[int, typer.Option(help="Days the events span, ending yesterday.", min=1)] = 7,
    rate: Annotated[
        float, typer.Option(help="Events per second (0 = as fast as possible).", min=0)
    ] = 0,
    invalid_ratio: Annotated[
        float, typer.Option(help="Share of invalid events.", min=0, max=1)
    ] = 0.0,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same events).")] = 42,
    from_csv: Annotated[
        Path | None, typer.Option(help="Replay a CSV in the public dataset's format instead.")
    ] = None,
    start: Annotated[
        str | None,
        typer.Option(help="First day (YYYY-MM-DD, or 'today'); default: `days` days ago."),
    ] = None,
    price_scale: Annotated[
        float, typer.Option(help="Multiply every price (plant a shift to see drift).", min=0)
    ] = 1.0,
) -> None:
    """Send events to the raw topic: synthetic sessions, or a replay of a real CSV dump."""
    from datetime import UTC, datetime

    try:
        first = (
            None
            if start is None
            else datetime.now(UTC).date()
            if start == "today"
            else date.fromisoformat(start)
        )
    except ValueError as exc:
        _fail(f"--start: {exc} (expected YYYY-MM-DD or 'today')")
    stats = _produce(
        events=events,
        days=days,
        rate=rate,
        invalid_ratio=invalid_ratio,
        seed=seed,
        from_csv=from_csv,
        start=first,
        price_scale=price_scale,
    )
    out.print_json(json.dumps(stats))


def _produce(
    *,
    events: int,
    days: int,
    rate: float,
    invalid_ratio: float,
    seed: int,
    from_csv: Path | None,
    start: date | None = None,
    price_scale: float = 1.0,
) -> dict[str, object]:
    from easymlops.csv_replay import CsvFormatError, read_csv_events
    from easymlops.kafka import KafkaUnavailable, partitions
    from easymlops.produce import produce_payloads, produce_synthetic

    settings = get_settings()
    try:
        partitions(settings, settings.topic_raw)
    except KafkaUnavailable as exc:
        _fail(str(exc))
    label = "producing"
    if from_csv is not None:
        if not from_csv.is_file():
            _fail(f"{from_csv}: no such file")
        try:
            payloads = read_csv_events(from_csv)
        except CsvFormatError as exc:
            _fail(f"{from_csv}: {exc}")
        label = f"replaying {from_csv.name}"
    with _progress() as bar:
        task = bar.add_task(
            label,
            total=None if from_csv else events,
            info=f"-> {settings.topic_raw}",
        )
        if from_csv is not None:
            stats = produce_payloads(
                settings, payloads, rate=rate or None, progress=lambda n: bar.advance(task, n)
            )
        else:
            stats = produce_synthetic(
                settings,
                events,
                days=days,
                seed=seed,
                invalid_ratio=invalid_ratio,
                rate=rate or None,
                progress=lambda n: bar.advance(task, n),
                start=start,
                price_scale=price_scale,
            )
    summary = stats.to_dict()
    if stats.failed:
        console.print(f"[red]{stats.failed} events were not delivered:[/red] {stats.failures[:3]}")
        out.print_json(json.dumps(summary))
        raise typer.Exit(1)
    console.print(f"[green]delivered {stats.delivered} events[/green] to {settings.topic_raw}")
    return summary


@app.command()
def validate(
    until_idle: Annotated[
        bool,
        typer.Option("--until-idle/--follow", help="Exit once the topic is drained, or run on."),
    ] = True,
    idle_seconds: Annotated[float, typer.Option(help="Quiet time that counts as drained.")] = 5.0,
    batch_size: Annotated[
        int, typer.Option(help="Messages per batch (one Kafka transaction).", min=1)
    ] = 5000,
    session_features: Annotated[
        bool,
        typer.Option(help="Keep feat:session:{id} current in Redis from the validated stream."),
    ] = True,
    max_outage: Annotated[
        float, typer.Option(help="Seconds to wait out a broker or Redis outage before failing.")
    ] = 300.0,
    log_interval: Annotated[
        float, typer.Option(help="Seconds between progress log lines.", min=0.1)
    ] = 10.0,
) -> None:
    """Validate the raw topic into the validated topic and the dead-letter topic, exactly once.

    SIGTERM or Ctrl-C finishes the batch in flight, commits it and exits; a restart resumes
    from the committed offsets."""
    stats = _validate(
        until_idle=until_idle,
        idle_seconds=idle_seconds,
        batch_size=batch_size,
        session_features=session_features,
        max_outage=max_outage,
        log_interval=log_interval,
    )
    out.print_json(json.dumps(stats))


def _validate(
    *,
    until_idle: bool = True,
    idle_seconds: float = 5.0,
    batch_size: int = 5000,
    session_features: bool = True,
    max_outage: float = 300.0,
    log_interval: float = 10.0,
) -> dict[str, object]:
    import logging

    from rich.logging import RichHandler

    from easymlops.kafka import KafkaUnavailable, partitions
    from easymlops.validate import OutageTooLong, ValidatorFenced, run_validator

    # The validator's periodic progress line and outage warnings, beside the progress bar.
    validator_log = logging.getLogger("easymlops.validate")
    if not any(isinstance(h, RichHandler) for h in validator_log.handlers):
        validator_log.addHandler(RichHandler(console=console, show_path=False))
    validator_log.setLevel(logging.INFO)

    settings = get_settings()
    try:
        for topic in (settings.topic_raw, settings.topic_validated, settings.topic_invalid):
            partitions(settings, topic)
    except KafkaUnavailable as exc:
        _fail(str(exc))
    stopping = {"flag": False}

    def stop(_signum: int, _frame: object) -> None:
        stopping["flag"] = True  # finish the batch in flight, commit, then exit

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with _progress() as bar:
        task = bar.add_task("validating", total=None, info="")

        def show(stats) -> None:  # type: ignore[no-untyped-def]
            bar.update(
                task,
                completed=stats.consumed,
                info=f"valid {stats.valid}  invalid {stats.invalid}  {stats.rate:,.0f} ev/s",
            )

        try:
            stats = run_validator(
                settings,
                until_idle=until_idle,
                idle_seconds=idle_seconds,
                batch_size=batch_size,
                session_features=session_features,
                max_outage_seconds=max_outage,
                log_interval=log_interval,
                progress=show,
                should_stop=lambda: stopping["flag"],
            )
        except (OutageTooLong, ValidatorFenced) as exc:
            _fail(str(exc))
    console.print(
        f"[green]consumed {stats.consumed}[/green]: valid {stats.valid}, invalid {stats.invalid} "
        f"{dict(stats.errors) if stats.errors else ''}"
    )
    return stats.to_dict()


@app.command()
def prepare() -> None:
    """Parse the dbt project and create the local Dagster instance (run by `make`)."""
    from easymlops.pipeline import dagster_home
    from easymlops.warehouse import prepare_manifest

    settings = get_settings()
    out.print(f"dbt manifest: {prepare_manifest()}")
    out.print(f"Dagster instance: {dagster_home(settings)}")


@app.command()
def demo(
    events: Annotated[int, typer.Option(help="Synthetic events to produce.", min=1000)] = 50_000,
    days: Annotated[int, typer.Option(help="Days the events span.", min=3)] = 7,
    invalid_ratio: Annotated[
        float, typer.Option(help="Share of invalid events.", min=0, max=1)
    ] = 0.01,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 42,
    predictions: Annotated[
        int, typer.Option(help="Sequential sample predictions to time.", min=1)
    ] = 200,
) -> None:
    """Up, produce, validate, materialize every asset through Dagster, predict, summarize."""
    from easymlops.demo import run_demo

    code = run_demo(
        console=console,
        out=out,
        events=events,
        days=days,
        invalid_ratio=invalid_ratio,
        seed=seed,
        predictions=predictions,
        produce=lambda: _produce(
            events=events, days=days, rate=0, invalid_ratio=invalid_ratio, seed=seed, from_csv=None
        ),
        validate=lambda: _validate(until_idle=True, idle_seconds=5.0),
    )
    raise typer.Exit(code)


@app.command()
def pipeline(
    first: Annotated[
        str | None, typer.Option("--from", help="First event date (YYYY-MM-DD) to build.")
    ] = None,
    last: Annotated[
        str | None, typer.Option("--to", help="Last event date (YYYY-MM-DD) to build.")
    ] = None,
    predictions: Annotated[
        int, typer.Option(help="Sample predictions to time afterwards (0 = none).", min=0)
    ] = 50,
) -> None:
    """Land what Kafka holds, build silver and gold for the dates, score and check the new
    dates with the champion, retrain, gate and deploy: the demo's stage 4, with its summary."""
    from datetime import date

    from easymlops.demo import run_pipeline_command

    try:
        dates = [None if d is None else date.fromisoformat(d) for d in (first, last)]
    except ValueError as exc:
        _fail(f"--from/--to: {exc} (expected YYYY-MM-DD)")
    code = run_pipeline_command(
        console=console, out=out, first=dates[0], last=dates[1], predictions=predictions
    )
    raise typer.Exit(code)


model_app = typer.Typer(
    help="Show and move the model's aliases (champion, challenger), with their history.",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")


def _operator() -> str:
    import getpass

    return f"cli:{getpass.getuser()}"


@model_app.command("list")
def model_list(
    history: Annotated[int, typer.Option(help="Alias moves to show, newest last.")] = 10,
) -> None:
    """Versions with their aliases and gate verdicts, then the latest alias moves."""
    from datetime import UTC, datetime

    from easymlops import registry

    settings = get_settings()
    aliases = registry.aliases(settings)
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(version, []).append(alias)
    table = Table("version", "aliases", "promotion gate", "created (UTC)", "run")
    for mv in registry.all_versions(settings):
        created = datetime.fromtimestamp((mv.creation_timestamp or 0) / 1000, UTC)
        table.add_row(
            str(mv.version),
            ", ".join(sorted(by_version.get(str(mv.version), []))),
            (mv.tags or {}).get(registry.GATE_TAG, "not gated"),
            created.strftime("%Y-%m-%d %H:%M:%S"),
            mv.run_id or "",
        )
    out.print(table)
    hold = registry.champion_hold(settings)
    if hold is not None:
        out.print(f"champion held: a version newer than {hold} must pass the gate to replace it")
    moves = registry.alias_history(settings)[-history:] if history > 0 else []
    for move in moves:
        out.print(f"  #{move.seq} {move.describe()}")


@model_app.command("promote")
def model_promote(
    version: Annotated[str, typer.Argument(help="Version to make champion.")],
    force: Annotated[
        bool, typer.Option(help="Promote even if it did not pass the promotion gate.")
    ] = False,
) -> None:
    """Make VERSION the champion; it stays champion until a newer version passes the gate."""
    from mlflow.exceptions import MlflowException

    from easymlops import promotion, registry

    settings = get_settings()
    try:
        if not force:
            promotion.require_gate_passed(version, settings)
        registry.promote(version, settings, by=_operator(), reason="promote", hold=True)
    except (promotion.NotGated, MlflowException) as exc:
        _fail(f"{exc}{'' if force else ' (--force promotes anyway)'}")
    out.print(f"{settings.model_name}@{settings.champion_alias} -> version {version}")


@model_app.command("rollback")
def model_rollback() -> None:
    """Move the champion back to the previous one; it stays until a newer version passes."""
    from easymlops import registry

    settings = get_settings()
    try:
        move = registry.rollback(settings, by=_operator())
    except ValueError as exc:
        _fail(str(exc))
    out.print(f"{settings.model_name}: {move.describe()}")


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())


flink_app = typer.Typer(
    help="The validation job on the standalone Flink cluster (`easymlops up --with-flink`).",
    no_args_is_help=True,
)
app.add_typer(flink_app, name="flink")


@flink_app.command("submit")
def flink_submit(
    checkpoint_interval_ms: Annotated[
        int, typer.Option(help="Checkpoint (and Kafka transaction commit) interval.")
    ] = 10_000,
    from_savepoint: Annotated[
        str, typer.Option(help="Resume from this savepoint (as `easymlops flink stop` printed).")
    ] = "",
    parallelism: Annotated[int, typer.Option(min=1)] = 1,
    session_features: Annotated[
        bool, typer.Option(help="Write the feat:session:* hashes to Redis.")
    ] = True,
) -> None:
    """Submit flink_jobs/validation_job.py in Kafka mode (events.raw -> events.validated |
    events.invalid, exactly once, + session events to Redis) and wait until it runs."""
    from easymlops import flink_cluster, stack

    settings = get_settings()
    args = ["kafka", "--checkpoint-interval-ms", str(checkpoint_interval_ms)]
    args += ["--parallelism", str(parallelism)]
    if not session_features:
        args.append("--no-session-features")
    console.print(f"submitting the validation job to {flink_cluster.rest_url(settings)} ...")
    try:
        job_id = flink_cluster.submit(
            settings, stack.flink_data_dir(settings), args, savepoint=from_savepoint or None
        )
        flink_cluster.wait_for(settings, job_id, "RUNNING", 300, checkpoints=1)
    except flink_cluster.FlinkSetupError as exc:
        _fail(str(exc))
    out.print(
        f"job {job_id} running; web UI: {flink_cluster.rest_url(settings)}/#/job/running",
        soft_wrap=True,
    )


@flink_app.command("stop")
def flink_stop(
    job_id: Annotated[str, typer.Argument(help="Default: every running job.")] = "",
    savepoint_dir: Annotated[
        str, typer.Option(help="Where the savepoint goes (default: the cluster's savepoints/).")
    ] = "",
) -> None:
    """Stop the job with a savepoint (its last transactions commit) and print where it is."""
    from easymlops import flink_cluster

    settings = get_settings()
    try:
        running = [j["jid"] for j in flink_cluster.jobs(settings) if j["state"] == "RUNNING"]
    except Exception as exc:
        _fail(f"Flink REST API at {flink_cluster.rest_url(settings)}: {exc}")
    targets = [job_id] if job_id else running
    if not targets:
        out.print("no running job")
    for target in targets:
        try:
            location = flink_cluster.stop_with_savepoint(settings, target, savepoint_dir or None)
        except Exception as exc:
            _fail(f"stopping job {target}: {exc}")
        # Unwrapped, so the path can be copied into `flink submit --from-savepoint`.
        out.print(f"job {target} stopped; savepoint: {location}", soft_wrap=True)
