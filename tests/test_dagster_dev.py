"""`dagster dev` loads the code location however it is started: here as `.venv/bin/dagster dev`
with a PATH that lacks the virtualenv's bin/ (no `dbt` on PATH), as a user who never activated
the virtualenv would start it; and the loop's schedules and sensors are running in it. Asked
through the webserver's GraphQL API, as the UI does."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import free_port

REPO = Path(__file__).resolve().parent.parent
AUTOMATION = """{ repositoriesOrError { ... on RepositoryConnection { nodes {
  schedules { name scheduleState { status } } sensors { name sensorState { status } } } } } }"""
# What a user who opens the UI finds running (README, "Aliases, rollback, schedules and
# sensors"), and what is stopped on purpose.
RUNNING = {
    "retrain_schedule",
    "daily_refresh_schedule",
    "mlflow_registry_sensor",
    "alert_on_run_failure",
    "bronze_predictions_sensor",
    "drift_retraining_sensor",
}
STOPPED = {"bronze_events_sensor", "bronze_invalid_events_sensor", "late_events_sensor"}
LOCATIONS = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def test_dagster_dev_loads_without_the_virtualenv_on_path(tmp_path: Path) -> None:
    venv_bin = Path(sys.executable).parent
    path = os.pathsep.join(
        p for p in os.environ.get("PATH", "").split(os.pathsep) if p and Path(p) != venv_bin
    )
    port = free_port()
    env = {
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "PATH": path or "/usr/bin:/bin",
        "DAGSTER_HOME": str(tmp_path),
    }
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    log = tmp_path / "dagster-dev.log"
    command = [str(venv_bin / "dagster"), "dev", "-w", "workspace.yaml"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*command, "-h", "127.0.0.1", "-p", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        entry = None
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                response = httpx.post(
                    f"http://127.0.0.1:{port}/graphql", json={"query": LOCATIONS}, timeout=10
                )
                entries = response.json()["data"]["workspaceOrError"]["locationEntries"]
                entry = entries[0] if entries else None
                if entry and entry["loadStatus"] == "LOADED":
                    break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(2)
        assert proc.poll() is None, f"dagster dev exited:\n{log.read_text()[-3000:]}"
        assert entry is not None and entry["loadStatus"] == "LOADED", log.read_text()[-3000:]
        location = entry["locationOrLoadError"]
        assert location["__typename"] == "RepositoryLocation", location.get("message", location)
        response = httpx.post(
            f"http://127.0.0.1:{port}/graphql", json={"query": AUTOMATION}, timeout=30
        )
        (repository,) = response.json()["data"]["repositoriesOrError"]["nodes"]
        status = {s["name"]: s["scheduleState"]["status"] for s in repository["schedules"]}
        status |= {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
        assert {name for name, state in status.items() if state == "RUNNING"} == RUNNING, status
        assert {name for name, state in status.items() if state == "STOPPED"} >= STOPPED, status
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
