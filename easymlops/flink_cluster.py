"""A standalone Flink cluster on loopback (`easymlops up --with-flink`, `make flink-cluster`): one
jobmanager and one taskmanager, started in the foreground from the PyFlink distribution's own
scripts (`pyflink/bin/jobmanager.sh`, `taskmanager.sh` in `.flink-venv`, the same Flink release
the job is written for), with the configuration written here into the stack's data folder:

    data/flink/conf/config.yaml      ports, memory, checkpoint and savepoint dirs, restarts
    data/flink/checkpoints/          retained checkpoints (the job restores from the latest)
    data/flink/savepoints/           `stop_with_savepoint` writes here unless told otherwise
    logs/flink-jobmanager.log, logs/flink-taskmanager.log   (the stack's log files)

The job (flink_jobs/validation_job.py in kafka mode) is submitted with `bin/flink run`, the only
way to submit a Python job, and watched and stopped through the jobmanager's REST API.

Why these settings: a killed taskmanager must be noticed in seconds, not Flink's default 50 s
(heartbeat.timeout), so a test can kill one and see the job restart from its last checkpoint
on the next; the Kafka connector jar travels with the job (`--jar`, a user jar), because the
PyFlink wheel's lib/ belongs to the virtualenv, not to us.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
FLINK_VENV = ROOT / ".flink-venv"
#: Where `make jars` puts the Flink Kafka connector (infra/maven/pom.xml, execution "flink").
CONNECTOR_JARS = ROOT / "infra" / "maven" / "target" / "flink"
JOB_MODULE = "flink_jobs.validation_job"
# Sized for a 2-core, shared machine: the taskmanager's Python workers take managed memory.
JOBMANAGER_MEMORY = "1024m"
TASKMANAGER_MEMORY = "1728m"
TASK_SLOTS = 2
# A killed taskmanager is declared lost after this long (Flink's default is 50 s).
HEARTBEAT_TIMEOUT_MS = 10_000


class FlinkSetupError(RuntimeError):
    """PyFlink's virtualenv, Java or the connector jar is missing, or the cluster refused a
    request; the message says which and how to fix it."""


def flink_home() -> Path:
    """The PyFlink distribution in `.flink-venv` (bin/, lib/, opt/, conf/)."""
    for candidate in sorted(FLINK_VENV.glob("lib/python3*/site-packages/pyflink")):
        if (candidate / "bin" / "jobmanager.sh").is_file():
            return candidate
    raise FlinkSetupError(
        f"PyFlink is not installed in {FLINK_VENV}: run `make flink-venv` (the Flink cluster "
        "runs from the PyFlink distribution)"
    )


def python() -> Path:
    return FLINK_VENV / "bin" / "python"


def connector_jar() -> Path:
    jars = sorted(CONNECTOR_JARS.glob("flink-sql-connector-kafka-*.jar"))
    if not jars:
        raise FlinkSetupError(
            f"the Flink Kafka connector is not in {CONNECTOR_JARS}: run `make jars` (fetches it "
            "from Maven Central with mvn)"
        )
    return jars[-1]


def _java_home() -> str:
    java = shutil.which("java")
    if java is None:
        raise FlinkSetupError("Flink needs Java 17: `apt-get install openjdk-17-jre-headless`")
    # Flink's scripts find java through JAVA_HOME or PATH; PATH is enough, but JAVA_HOME keeps
    # a developer's other JDK from being picked.
    return str(Path(os.path.realpath(java)).parent.parent)


def rest_url(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.flink_rest_port}"


# Flink's Prometheus reporter (a plugin of the distribution, PyFlink's and the image's).
PROMETHEUS_REPORTER = "org.apache.flink.metrics.prometheus.PrometheusReporterFactory"
# The series of the validation job's routing counter (flink_jobs/validation_job.py
# RouteFunction), as that reporter names it; label `destination` = valid | invalid.
ROUTED_EVENTS_METRIC = "flink_taskmanager_job_task_operator_easymlops_destination_events"
# Flink's own jobmanager series behind the restart and not-running alerts: restarts of a job
# (label `job_id`) since it was submitted, and the number of jobs running.
RESTARTS_METRIC = "flink_jobmanager_job_numRestarts"
RUNNING_JOBS_METRIC = "flink_jobmanager_numRunningJobs"


def metrics_ports(settings: Settings) -> str:
    """The port range of the Prometheus reporters: one port for each Flink process."""
    return f"{settings.flink_metrics_port}-{settings.flink_metrics_port + 1}"


def metrics_urls(settings: Settings) -> list[str]:
    return [
        f"http://{settings.host}:{port}/metrics"
        for port in (settings.flink_metrics_port, settings.flink_metrics_port + 1)
    ]


def configuration(settings: Settings, data_dir: Path) -> dict[str, Any]:
    """The cluster's config.yaml, as flat keys."""
    shipped = yaml.safe_load((flink_home() / "conf" / "config.yaml").read_text())
    host = settings.host
    return {
        # Java 17 needs the --add-opens of the distribution's own config.
        "env.java.opts.all": shipped["env"]["java"]["opts"]["all"],
        "jobmanager.rpc.address": host,
        "jobmanager.rpc.port": settings.flink_rpc_port,
        "jobmanager.bind-host": host,
        "jobmanager.memory.process.size": JOBMANAGER_MEMORY,
        "jobmanager.execution.failover-strategy": "region",
        "rest.address": host,
        "rest.bind-address": host,
        "rest.port": settings.flink_rest_port,
        "taskmanager.host": host,
        "taskmanager.bind-host": host,
        "taskmanager.rpc.port": settings.flink_taskmanager_port,
        "taskmanager.numberOfTaskSlots": TASK_SLOTS,
        "taskmanager.memory.process.size": TASKMANAGER_MEMORY,
        "parallelism.default": 1,
        "heartbeat.interval": 2_000,
        "heartbeat.timeout": HEARTBEAT_TIMEOUT_MS,
        "execution.checkpointing.dir": (data_dir / "checkpoints").as_uri(),
        "execution.checkpointing.savepoint-dir": (data_dir / "savepoints").as_uri(),
        "execution.checkpointing.num-retained": 3,
        # Restart forever, every 2 s: the job waits out a lost taskmanager or broker.
        "restart-strategy.type": "fixed-delay",
        "restart-strategy.fixed-delay.attempts": 2_147_483_647,
        "restart-strategy.fixed-delay.delay": "2 s",
        # Metrics for Prometheus (the plugin ships with PyFlink): the jobmanager and the
        # taskmanager each take the first free port of the two.
        "metrics.reporter.prom.factory.class": PROMETHEUS_REPORTER,
        "metrics.reporter.prom.port": metrics_ports(settings),
        # Python workers run the interpreter that has pyflink (and the job's imports).
        "python.executable": str(python()),
        "python.client.executable": str(python()),
        "io.tmp.dirs": str(data_dir / "tmp"),
        "web.tmpdir": str(data_dir / "tmp" / "web"),
        "blob.storage.directory": str(data_dir / "tmp" / "blobs"),
    }


def prepare(settings: Settings, data_dir: Path, role: str) -> tuple[list[str], dict[str, str]]:
    """Write the configuration into `data_dir/conf` and return the foreground command of
    `role` ("jobmanager" | "taskmanager") and its environment."""
    home = flink_home()
    conf = data_dir / "conf"
    conf.mkdir(parents=True, exist_ok=True)
    for directory in ("checkpoints", "savepoints", "tmp/web", "tmp/blobs"):
        (data_dir / directory).mkdir(parents=True, exist_ok=True)
    config = configuration(settings, data_dir)
    (conf / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    for name in ("log4j-console.properties", "log4j-cli.properties", "log4j.properties"):
        shutil.copyfile(home / "conf" / name, conf / name)
    env = {
        "FLINK_CONF_DIR": str(conf),
        "FLINK_LOG_DIR": str(data_dir / "log"),
        "JAVA_HOME": _java_home(),
    }
    return ["bash", str(home / "bin" / f"{role}.sh"), "start-foreground"], env


# ---- the REST API -------------------------------------------------------------------------------
def _get(settings: Settings, path: str, timeout: float = 3.0) -> Any:
    response = httpx.get(f"{rest_url(settings)}{path}", timeout=timeout)
    response.raise_for_status()
    return response.json()


def jobmanager_health(settings: Settings) -> str | None:
    try:
        overview = _get(settings, "/overview")
    except httpx.HTTPError as exc:
        return f"REST API at {rest_url(settings)}: {type(exc).__name__}: {exc}"
    return None if "flink-version" in overview else f"unexpected /overview: {overview}"


def registered_taskmanagers(settings: Settings) -> list[dict[str, Any]]:
    return list(_get(settings, "/taskmanagers").get("taskmanagers", []))


def taskmanager_health(settings: Settings, resource_id: str) -> str | None:
    """Healthy once the taskmanager `resource_id` is registered with the jobmanager."""
    try:
        ids = [tm["id"] for tm in registered_taskmanagers(settings)]
    except httpx.HTTPError as exc:
        return f"jobmanager REST API at {rest_url(settings)}: {type(exc).__name__}: {exc}"
    return None if resource_id in ids else f"not registered yet (registered: {ids or 'none'})"


def jobs(settings: Settings) -> list[dict[str, Any]]:
    """Every job the cluster knows: jid, name, state, start-time, ..."""
    return list(_get(settings, "/jobs/overview").get("jobs", []))


def job_state(settings: Settings, job_id: str) -> str:
    """The job's state; RUNNING only once every task runs (Flink says RUNNING as soon as the
    job is scheduled, while its tasks may still be initializing or failing over)."""
    job = _get(settings, f"/jobs/{job_id}")
    state = str(job["state"])
    if state == "RUNNING" and any(v["status"] != "RUNNING" for v in job.get("vertices", [])):
        return "RUNNING (tasks starting)"
    return state


def completed_checkpoints(settings: Settings, job_id: str) -> int:
    return int(_get(settings, f"/jobs/{job_id}/checkpoints")["counts"]["completed"])


def restored_from(settings: Settings, job_id: str) -> dict[str, Any] | None:
    """The checkpoint or savepoint the job last restored from (is_savepoint, external_path,
    ...), or None if it started fresh."""
    latest = _get(settings, f"/jobs/{job_id}/checkpoints").get("latest") or {}
    restored = latest.get("restored")
    return dict(restored) if restored else None


def wait_for(
    settings: Settings, job_id: str, state: str, timeout: float, *, checkpoints: int = 0
) -> None:
    """Wait until the job is in `state` (and has at least `checkpoints` completed ones)."""
    deadline = time.monotonic() + timeout
    last = "unknown"
    while time.monotonic() < deadline:
        try:
            last = job_state(settings, job_id)
            if last in ("FAILED", "CANCELED", "FINISHED") and last != state:
                raise FlinkSetupError(f"job {job_id} is {last}, expected {state}")
            if last == state and (
                checkpoints == 0 or completed_checkpoints(settings, job_id) >= checkpoints
            ):
                return
        except httpx.HTTPError as exc:
            last = f"REST error {exc}"
        time.sleep(0.5)
    raise FlinkSetupError(
        f"job {job_id} not {state}"
        + (f" with {checkpoints} checkpoints" if checkpoints else "")
        + f" after {timeout:.0f} s (last: {last})"
    )


def stop_with_savepoint(
    settings: Settings, job_id: str, directory: str | None = None, timeout: float = 120.0
) -> str:
    """Stop the job with a savepoint (the Kafka sinks commit their last transactions) and
    return the savepoint's location, to resume from with `submit(..., savepoint=...)`. Returns
    once the job has finished, not merely once the savepoint is written: Flink completes the
    savepoint first and ends the tasks after it, and a job resumed in between would run beside
    the one it replaces."""
    body: dict[str, Any] = {"drain": False}
    if directory:
        body["targetDirectory"] = directory
    response = httpx.post(f"{rest_url(settings)}/jobs/{job_id}/stop", json=body, timeout=10)
    response.raise_for_status()
    trigger = response.json()["request-id"]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = _get(settings, f"/jobs/{job_id}/savepoints/{trigger}")
        if status["status"]["id"] == "COMPLETED":
            operation = status.get("operation", {})
            if "location" not in operation:
                raise FlinkSetupError(f"savepoint of job {job_id} failed: {operation}")
            wait_for(settings, job_id, "FINISHED", max(deadline - time.monotonic(), 1.0))
            return str(operation["location"])
        time.sleep(0.5)
    raise FlinkSetupError(f"savepoint of job {job_id} not done after {timeout:.0f} s")


def cancel(settings: Settings, job_id: str) -> None:
    httpx.patch(f"{rest_url(settings)}/jobs/{job_id}", params={"mode": "cancel"}, timeout=10)


# ---- submitting the validation job ----------------------------------------------------------
_JOB_ID = re.compile(r"JobID ([0-9a-f]{32})")


def submit(
    settings: Settings,
    data_dir: Path,
    job_args: list[str],
    *,
    savepoint: str | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 300.0,
) -> str:
    """Submit flink_jobs/validation_job.py, detached, with `job_args` (e.g. ["kafka",
    "--checkpoint-interval-ms", "2000"]) and the Kafka connector as a user jar; resume from
    `savepoint` if given. Returns the job id. The job reads its EASYMLOPS_* settings from the
    environment of this call (the driver runs here, then the job graph goes to the cluster)."""
    home = flink_home()
    command = ["bash", str(home / "bin" / "flink"), "run", "--detached"]
    if savepoint:
        command += ["--fromSavepoint", savepoint]
    command += ["--python", str(ROOT / "flink_jobs" / "validation_job.py")]
    command += [*job_args, "--jar", connector_jar().as_uri()]
    run_env = {**os.environ, **(env or {})}
    run_env.update(
        FLINK_CONF_DIR=str(data_dir / "conf"),
        FLINK_LOG_DIR=str(data_dir / "log"),
        JAVA_HOME=_java_home(),
        # The driver's `from flink_jobs import validation_job` and the rules in easymlops.
        PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), run_env.get("PYTHONPATH", "")])),
    )
    if not (data_dir / "conf" / "config.yaml").is_file():
        raise FlinkSetupError(
            f"no Flink cluster configuration in {data_dir / 'conf'}: start the cluster first "
            "(`easymlops up --with-flink` or `make flink-cluster`)"
        )
    try:
        done = subprocess.run(
            command, env=run_env, cwd=ROOT, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        raise FlinkSetupError(f"`flink run` did not return within {timeout:.0f} s") from None
    found = _JOB_ID.search(done.stdout)
    if done.returncode != 0 or found is None:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-30:])
        raise FlinkSetupError(f"`flink run` failed (exit {done.returncode}):\n{tail}")
    return found.group(1)
