"""Dagster in its production shape (production-local profile): a gRPC code server of
`easymlops_assets.definitions`, the webserver (UI and GraphQL) and the daemon, three processes
sharing one instance (infra/dagster/production-local/dagster.yaml: runs and event logs in the
`dagster` database on the stack's PostgreSQL, compute logs in its S3, a queued run coordinator,
DefaultRunLauncher).

The run workers are children of the code server, so they see its environment: the caller's
EASYMLOPS_* settings (what `easymlops up` was started with) plus the stack's own addresses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx

from easymlops.services import postgres, seaweedfs
from easymlops.services.supervisor import (
    FatalHealth,
    Launch,
    Profile,
    Spec,
    data_dir,
    http_ok,
    python_module,
)
from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent.parent
#: The instance; copied into DAGSTER_HOME at every start, so the committed file is the one
#: truth (it holds `env:` references only).
TEMPLATE = ROOT / "infra" / "dagster" / "production-local" / "dagster.yaml"
#: Code location name, as in pyproject's [tool.dagster] and the compose workspace.
CODE_LOCATION = "easymlops"
CODE_MODULE = "easymlops_assets.definitions"
#: Dagster's own database on the stack's PostgreSQL.
DATABASE = "dagster"
PROFILES: frozenset[Profile] = frozenset({"production-local"})


class GraphQLError(RuntimeError):
    """Dagster's webserver answered a GraphQL query with errors (a health check retries it)."""


def home(settings: Settings) -> Path:
    """DAGSTER_HOME of the three processes."""
    return data_dir(settings, "dagster") / "home"


def webserver_url(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.dagster_port}"


def graphql(
    url: str, query: str, variables: Mapping[str, Any] | None = None, timeout: float = 30.0
) -> dict[str, Any]:
    """POST a query to Dagster's webserver; its `data`, or GraphQLError naming the errors."""
    response = httpx.post(
        f"{url.rstrip('/')}/graphql",
        json={"query": query, "variables": dict(variables or {})},
        timeout=timeout,
    )
    response.raise_for_status()
    body = response.json()
    if body.get("errors"):
        messages = "; ".join(str(error.get("message")) for error in body["errors"])
        raise GraphQLError(f"dagster-webserver: GraphQL errors: {messages}")
    return dict(body["data"])


def _env(settings: Settings, process: str) -> dict[str, str]:
    """What every Dagster process reads: DAGSTER_HOME, the variables dagster.yaml names, and a
    compute-log staging folder of its own. Own staging folders, so the webserver serves compute
    logs from S3 as on separate machines, not from the run worker's local copy."""
    staging = data_dir(settings, process) / "compute-log-staging"
    return {
        "DAGSTER_HOME": str(home(settings)),
        **postgres.client_env(settings),
        **seaweedfs.client_env(settings),
        "EASYMLOPS_DAGSTER_PG_DB": DATABASE,
        "EASYMLOPS_DAGSTER_COMPUTE_LOG_BUCKET": settings.s3_bucket,
        "EASYMLOPS_DAGSTER_COMPUTE_LOG_STAGING": str(staging),
    }


def _write_home(settings: Settings) -> None:
    """DAGSTER_HOME: the committed instance template, as is (it holds only `env:` references),
    and the workspace that points the webserver and the daemon at the code server."""
    folder = home(settings)
    folder.mkdir(parents=True, exist_ok=True)
    _replace(folder / "dagster.yaml", TEMPLATE.read_text())
    workspace = {
        "load_from": [
            {
                "grpc_server": {
                    "host": settings.host,
                    "port": settings.dagster_grpc_port,
                    "location_name": CODE_LOCATION,
                }
            }
        ]
    }
    # JSON is YAML; no yaml writer needed.
    _replace(folder / "workspace.yaml", json.dumps(workspace, indent=2) + "\n")


def _replace(path: Path, text: str) -> None:
    """Write `path` whole or not at all: the three processes' prepare steps rewrite these files
    while another may be starting and reading them. The partial file's name is unique per call:
    `up` prepares the webserver and the daemon in two threads of one process at the same time,
    and a name per process let one thread move the other's file away (FileNotFoundError)."""
    fd, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.chmod(partial, 0o644)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


# ---- the code server -------------------------------------------------------------------------


def _prepare_code_server(settings: Settings) -> None:
    _write_home(settings)
    postgres.create_database(settings, DATABASE)
    # `dagster api grpc` is not `dagster dev`: DbtProject.prepare_if_dev does nothing there, so
    # dbt's manifest must exist before the code location loads (as `make` and the CLI ensure).
    from easymlops.warehouse import DBT_PROJECT_DIR, prepare_manifest

    if not (DBT_PROJECT_DIR / "target" / "manifest.json").exists():
        prepare_manifest()


def _code_launch(settings: Settings) -> Launch:
    argv = [
        *python_module("dagster-code", "dagster"),
        "api",
        "grpc",
        "--host",
        settings.host,
        "--port",
        str(settings.dagster_grpc_port),
        "--module-name",
        CODE_MODULE,
        "--location-name",
        CODE_LOCATION,
    ]
    # MLflow is the stack's: the run workers log to the server this stack runs.
    env = {**_env(settings, "dagster-code"), "EASYMLOPS_MLFLOW_TRACKING_URI": settings.mlflow_uri}
    return Launch(argv, env)


def _grpc_health(settings: Settings) -> str | None:
    """`dagster api grpc-health-check`: what a Kubernetes probe of the code server runs."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "api",
            "grpc-health-check",
            "--host",
            settings.host,
            "--port",
            str(settings.dagster_grpc_port),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode == 0:
        return None
    lines = (result.stderr or result.stdout).strip().splitlines()
    return lines[-1] if lines else f"grpc-health-check exited {result.returncode}"


# ---- the webserver ---------------------------------------------------------------------------

LOCATION_STATUS = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def code_location_health(settings: Settings) -> str | None:
    """The webserver has loaded the code location from the code server. A location that fails
    to load is final: its error (the Python exception) becomes the failure's cause."""
    data = graphql(webserver_url(settings), LOCATION_STATUS, timeout=10)
    entries = data["workspaceOrError"].get("locationEntries") or []
    entry = next((e for e in entries if e["name"] == CODE_LOCATION), None)
    if entry is None:
        return f"code location {CODE_LOCATION!r} is not in the workspace"
    location = entry.get("locationOrLoadError") or {}
    message = str(location.get("message", "")).strip()
    if location.get("__typename") == "PythonError":
        if "Unreachable" in message or "Could not reach" in message:
            return f"code server unreachable: {message.splitlines()[0] if message else '?'}"
        raise FatalHealth(
            f"dagster-webserver: code location {CODE_LOCATION!r} failed to load: {message}"
        )
    if entry["loadStatus"] != "LOADED" or location.get("__typename") != "RepositoryLocation":
        return f"code location {CODE_LOCATION!r} is {entry['loadStatus']}"
    return None


def _webserver_health(settings: Settings) -> str | None:
    reason = http_ok(f"{webserver_url(settings)}/server_info", timeout=5.0)
    return reason if reason is not None else code_location_health(settings)


def _webserver_launch(settings: Settings) -> Launch:
    argv = [
        *python_module("dagster-webserver", "dagster_webserver"),
        "--host",
        settings.host,
        "--port",
        str(settings.dagster_port),
        "--workspace",
        str(home(settings) / "workspace.yaml"),
    ]
    return Launch(argv, _env(settings, "dagster-webserver"))


# ---- the daemon -------------------------------------------------------------------------------

DAEMON_HEALTH = """{ instance { daemonHealth { allDaemonStatuses {
  daemonType required healthy lastHeartbeatErrors { message } } } } }"""


def daemon_health(settings: Settings) -> str | None:
    """Every required daemon (run queue, schedules, sensors, backfills, run monitoring) sent a
    recent heartbeat, as the UI's Deployment page reports it (through the webserver, since the
    heartbeats are rows in the instance's PostgreSQL)."""
    data = graphql(webserver_url(settings), DAEMON_HEALTH, timeout=10)
    statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
    required = [s for s in statuses if s["required"]]
    if not required:
        return "no daemon is required by this instance (is the run coordinator queued?)"
    unhealthy = sorted(s["daemonType"] for s in required if not s["healthy"])
    return f"daemons without a recent heartbeat: {', '.join(unhealthy)}" if unhealthy else None


def _daemon_launch(settings: Settings) -> Launch:
    # `dagster-daemon run`, as the module dagster._daemon with our interpreter.
    argv = [*python_module("dagster-daemon", "dagster._daemon"), "run"]
    argv += ["--workspace", str(home(settings) / "workspace.yaml")]
    return Launch(argv, _env(settings, "dagster-daemon"))


SERVICES = (
    Spec(
        name="dagster-code",
        rank=50,
        url=lambda s: f"grpc://{s.host}:{s.dagster_grpc_port}",
        health=_grpc_health,
        launch=_code_launch,
        port_fields=lambda _s: ("dagster_grpc_port",),
        profiles=PROFILES,
        needs=("postgres", "s3"),
        prepare=_prepare_code_server,
        start_timeout=300.0,  # generous: a cold, busy machine has taken 40 s to load them
        stop_grace=20.0,
    ),
    # A launch from the UI only queues the run (QueuedRunCoordinator): the webserver launches
    # nothing itself.
    Spec(
        name="dagster-webserver",
        rank=60,
        url=webserver_url,
        health=_webserver_health,
        launch=_webserver_launch,
        port_fields=lambda _s: ("dagster_port",),
        profiles=PROFILES,
        needs=("postgres", "s3", "dagster-code"),
        prepare=_write_home,
        start_timeout=180.0,
        stop_grace=15.0,
    ),
    # Dequeues runs and has the code server launch them, runs schedules, sensors, backfills and
    # run monitoring. Its health is read through the webserver (the heartbeats are rows in
    # PostgreSQL), which starts in the same wave and is waited for by that check.
    Spec(
        name="dagster-daemon",
        rank=70,
        url=lambda s: f"{webserver_url(s)}/deployment/daemons",
        health=daemon_health,
        launch=_daemon_launch,
        profiles=PROFILES,
        needs=("postgres", "s3", "dagster-code"),
        prepare=_write_home,
        start_timeout=180.0,
        stop_grace=20.0,
    ),
)
