"""The one supervisor of the local stack (`easymlops up|down|status`): it knows how to start,
watch and stop a process, and nothing about Kafka, PostgreSQL or Ray. What each service is
(command, ports, health check, data and log folders, stop signal) is a `Spec` in a module of its
own in this package; `easymlops.services.registry()` collects them.

Layout under `settings.home_dir`:

    run/<name>.pid, run/<name>.json   who we started (pid, start time, port, command)
    logs/<name>.log                   stdout+stderr of the service
    data/<name>/                      its data and working directory

Why our own supervisor rather than supervisord or process-compose (both looked at):

- supervisord (PyPI `supervisor`) is a daemon that owns its children: `up` would start it and
  every later CLI call would talk to it over its socket; its `priority` orders starts but does
  not wait for a health check (a program is RUNNING after `startsecs`, not when it answers), so
  "Dagster after PostgreSQL accepts logins" would still be ours to write. It has no health
  checks, no run-as per program without running as root itself, and it is one more process
  whose death takes the stack's bookkeeping with it.
- process-compose (a Go binary; not on PyPI, the Go module proxy could build it) does have
  `depends_on: condition: process_healthy` and readiness probes, but probes are exec/HTTP only
  (a PostgreSQL login with the right password, a Kafka metadata request, a GraphQL query are
  not), it also runs as a foreground or daemon server that owns the processes, and it would be
  a second configuration language beside the settings every other part reads.
- What we need is small: records on disk that survive CLI invocations (so `down` in another
  terminal stops exactly what `up` started, and never a recycled pid or a developer's own
  Redis), health checks written in Python against the real protocol, failures that carry the
  service's log tail, start in dependency waves gated on health, and no extra daemon.

Other design choices:

- Every service starts in its own session (`start_new_session=True`) so closing the terminal
  or the CLI process does not take it down, and so it never receives our Ctrl-C.
- A launch is identified by its session id (the leader's pid) plus the leader's start time
  and the boot id, all set by the kernel. Every descendant stays in the session (Ray's raylet
  and workers, MLflow's uvicorn, PostgreSQL's backends, Dagster's run workers), so `down`
  signals exactly that session. (A random token in the environment does not work: Redis and
  Ray's workers overwrite their environ area with their process titles.)
- `up` checks everything it can before starting anything (ports, binaries, stale records), so
  a conflict fails fast with one line and leaves nothing half-started; then it starts every
  service in a thread of its own as soon as the services it `needs` are healthy (MLflow and Ray
  each need 15-30 s on two cores, the Dagster code server more).
- Services whose settings point at external endpoints are only health-checked.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import httpx

from easymlops.settings import Settings

State = Literal["running", "stopped", "unhealthy", "external"]
Profile = Literal["embedded", "production-local"]
PROFILES: tuple[Profile, ...] = ("embedded", "production-local")
Progress = Callable[[str], None]

_HAS_PROC = Path("/proc/self/stat").exists()
LOG_TAIL_LINES = 25

# Popen objects of services launched by this process, kept so that their exit status is
# reaped (no zombies in long-lived callers such as pytest) and no ResourceWarning is raised.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
_CHILDREN_LOCK = threading.Lock()


class StackError(RuntimeError):
    """A service of the local stack cannot be started, stopped or reached.

    The message names the service and the cause; when a log exists it ends with the log's
    path and last lines, so the CLI can print it as is.
    """


class _NotStarted(StackError):
    """A service `up` did not start because a service it needs failed (reported itself)."""


class _ExitedDuringStartup(StackError):
    """The process died before its health check passed (a start may be retried)."""


class FatalHealth(StackError):
    """Raised by a health check for a cause that waiting cannot fix (a refused password, code
    that does not load): `up` fails at once with it instead of at the start timeout."""


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


@dataclass(frozen=True)
class Launch:
    """One start of a service: its command, the environment added to ours (secrets go here,
    never on the command line, which `ps` shows), and what to keep in its record."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def _never(_settings: Settings) -> str:
    return ""


def _no_links(_settings: Settings) -> dict[str, str]:
    return {}


def _nobody(_settings: Settings) -> str | None:
    return None


@dataclass(frozen=True)
class Spec:
    """Everything the supervisor knows about one service.

    `rank` orders reports and starts; `needs` names services that must be healthy before this
    one starts (when they are part of the same `up`); `profiles` are the `up --profile` sets
    that include it (empty: started only when asked by name, like nginx). `launch` runs before
    anything starts (it may check and write configuration, raising StackError); `prepare` runs
    right before the process starts, in its wave (slow one-off work such as initdb); `ready`
    once the health check passes (create topics, databases, a bucket) and returns a line to
    report or None. `health` returns None when healthy, else why not. A Spec without `launch`
    is only observed (Ray Serve, deployed later on the Ray head)."""

    name: str
    rank: int
    url: Callable[[Settings], str]
    health: Callable[[Settings], str | None]
    launch: Callable[[Settings], Launch] | None = None
    port_fields: Callable[[Settings], tuple[str, ...]] = lambda _s: ()
    profiles: frozenset[Profile] = frozenset(PROFILES)
    needs: tuple[str, ...] = ()
    external: Callable[[Settings], str] = _never
    links: Callable[[Settings], dict[str, str]] = _no_links
    prepare: Callable[[Settings], None] | None = None
    ready: Callable[[Settings], str | None] | None = None
    after_stop: Callable[[Settings, Record], None] | None = None
    run_as: Callable[[Settings], str | None] = _nobody
    start_timeout: float = 120.0
    # Seconds between the stop signal and SIGKILL.
    stop_grace: float = 10.0
    stop_signal: signal.Signals = signal.SIGTERM
    # The stop signal to the session leader only, which stops its own children (PostgreSQL's
    # postmaster: a SIGINT to a backend would only cancel its query).
    stop_leader_only: bool = False
    # Starts again when the process exits before it is healthy (supervisord's startretries):
    # for a start that fails under load now and then, not for a wrong configuration.
    start_retries: int = 0

    def port(self, settings: Settings) -> int:
        fields = self.port_fields(settings)
        return int(getattr(settings, fields[0])) if fields else 0

    def check(self, settings: Settings) -> str | None:
        """The health check; raises only FatalHealth, so a malformed URL reads as 'unhealthy:
        why'."""
        try:
            return self.health(settings)
        except FatalHealth:
            raise
        except Exception as exc:
            return f"{type(exc).__name__}: {exc}"

    def observed(self) -> bool:
        return self.launch is None


def port_var(port_field: str) -> str:
    """The environment variable that moves a port (Settings field names map one to one)."""
    return f"EASYMLOPS_{port_field.upper()}"


# ---- paths and records -----------------------------------------------------------------------


def run_dir(settings: Settings) -> Path:
    return settings.home_dir / "run"


def log_path(settings: Settings, name: str) -> Path:
    """The log file of a managed service (it survives `down`, for post-mortems)."""
    return settings.home_dir / "logs" / f"{name}.log"


def data_dir(settings: Settings, name: str) -> Path:
    return settings.home_dir / "data" / name


@dataclass
class Record:
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
    run = run_dir(settings)
    return run / f"{name}.pid", run / f"{name}.json"


def read_record(settings: Settings, name: str) -> Record | None:
    _, meta = _record_paths(settings, name)
    try:
        return Record(**json.loads(meta.read_text()))
    except (OSError, ValueError, TypeError):
        return None


def write_record(settings: Settings, record: Record) -> None:
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
    run = run_dir(settings)
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


def boot_id() -> str:
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


def leader_alive(record: Record) -> bool:
    """The recorded process itself is alive and is really ours (not a recycled pid)."""
    _reap_children()
    if not _HAS_PROC:
        try:
            os.kill(record.pid, 0)
        except (ProcessLookupError, PermissionError):
            return False
        return True
    if record.boot_id != boot_id():
        return False
    stat = _proc_stat(record.pid)
    return stat is not None and stat.live and stat.start_ticks == record.start_ticks


def _members(record: Record) -> list[int]:
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
    if record.boot_id != boot_id():
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


def _signal(record: Record, pids: Sequence[int], sig: signal.Signals) -> None:
    if not _HAS_PROC:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(record.pid, sig)
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _terminate(spec: Spec, record: Record) -> bool:
    """The spec's stop signal to the launch (its leader only, or every process of its session),
    SIGKILL to what is left after its grace. Returns whether anything was running.

    New members can appear while we wait (a raylet restarting a worker): unless only the leader
    is to be signalled, the set is rescanned and newcomers get the stop signal too."""
    members = _members(record)
    if not members:
        return False
    leader_only = spec.stop_leader_only and record.pid in members
    first = [record.pid] if leader_only else members
    _signal(record, first, spec.stop_signal)
    signalled = set(first) if not leader_only else set(members)
    deadline = time.monotonic() + spec.stop_grace
    while time.monotonic() < deadline:
        time.sleep(0.1)
        members = _members(record)
        if not members:
            return True
        fresh = [pid for pid in members if pid not in signalled]
        _signal(record, fresh, spec.stop_signal)
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


# ---- helpers the service modules share -------------------------------------------------------


def port_free(host: str, port: int) -> bool:
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


def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    address = address.strip().split("://", 1)[-1].split("/", 1)[0]
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return address.strip("[]"), default_port
    return host.strip("[]"), int(port)


def http_ok(url: str, timeout: float = 3.0) -> str | None:
    """None when GET url answers 200, else why not."""
    try:
        response = httpx.get(url, timeout=timeout)
    except httpx.HTTPError as exc:
        return f"GET {url} failed: {exc}"
    if response.status_code != 200:
        return f"GET {url} returned HTTP {response.status_code}"
    return None


def packaged_binary(service: str, package: str, relative: str) -> Path:
    """Path of a binary shipped inside a wheel; a one-line StackError if it is not there."""
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
        raise StackError(f"{service}: {path} is not executable")
    return path


def venv_script(service: str, name: str) -> Path:
    """A console script installed next to our interpreter (ray, weed)."""
    path = Path(sys.executable).parent / name
    if not path.is_file():
        raise StackError(f"{service}: `{name}` not found next to {sys.executable}; run `uv sync`")
    return path


def python_module(service: str, module: str) -> list[str]:
    """`python -m module` with our interpreter, or a StackError naming the missing package."""
    # The top-level package only: find_spec of a submodule would import its parent (seconds).
    if importlib.util.find_spec(module.split(".")[0]) is None:
        raise StackError(f"{service}: package {module} is not installed in {sys.executable}")
    return [sys.executable, "-m", module]


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
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


def _failure(name: str, headline: str, settings: Settings, record: Record | None = None) -> str:
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
    record: Record | None = None
    launch: Launch | None = None


def _plan(spec: Spec, settings: Settings, say: Progress) -> _Plan:
    """Decide what `up` does for one service, raising StackError for what blocks a start.

    Runs before anything is started, so every conflict is reported without side effects.
    """
    assert spec.launch is not None
    if spec.external(settings):
        return _Plan("external")
    record = read_record(settings, spec.name)
    if record is not None:
        if leader_alive(record):
            # The same name may be another server in another profile (Tansu or Apache Kafka,
            # MLflow on SQLite or on PostgreSQL): never adopt one started for another profile.
            started_for = record.extra.get("profile", settings.profile)
            if started_for != settings.profile:
                raise StackError(
                    f"{spec.name}: already running for the {started_for} profile, not "
                    f"{settings.profile}; run `easymlops down` first"
                )
            if record.port != spec.port(settings):
                raise StackError(
                    f"{spec.name}: already running on port {record.port} (pid {record.pid}) but "
                    f"the settings say {spec.port(settings)}; run `easymlops down` first"
                )
            try:
                healthy = spec.check(settings) is None
            except FatalHealth:
                healthy = False
            return _Plan("running" if healthy else "wait", record)
        # Crashed or killed: clear what is left of its session.
        if _terminate(spec, record):
            say(f"{spec.name}: stopped leftover processes of a previous run")
        _remove_record(settings, spec.name)
    host = settings.host
    for port_field in spec.port_fields(settings):
        port = int(getattr(settings, port_field))
        # Ray's GCS listens on `host` only (an IPv6 socket on ::ffff:127.0.0.1, seen with
        # `ss`), but a process holding the port on all interfaces still keeps it from binding.
        hosts = (host, "0.0.0.0")
        if not all(port_free(h, port) for h in hosts):
            raise StackError(
                f"{spec.name}: port {port} on {host} is already in use by another process; "
                f"set {port_var(port_field)}"
            )
    return _Plan("start", launch=spec.launch(settings))


def _duplicate_ports(settings: Settings, specs: Sequence[Spec]) -> list[str]:
    seen: dict[int, str] = {}
    errors = []
    for spec in specs:
        for port_field in spec.port_fields(settings):
            port = int(getattr(settings, port_field))
            if port in seen:
                errors.append(
                    f"{spec.name}: port {port} is also configured for {seen[port]}; "
                    f"set {port_var(port_field)}"
                )
            seen.setdefault(port, port_var(port_field))
    return errors


def _user_ids(name: str) -> dict[str, Any]:
    entry = pwd.getpwnam(name)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _start(spec: Spec, settings: Settings, launch: Launch) -> Record:
    data = data_dir(settings, spec.name)
    data.mkdir(parents=True, exist_ok=True)
    log = log_path(settings, spec.name)
    log.parent.mkdir(parents=True, exist_ok=True)
    if spec.prepare is not None:
        spec.prepare(settings)
    run_as = spec.run_as(settings)
    ids = _user_ids(run_as) if run_as is not None else {}
    # RAY_ADDRESS is dropped: a Dagster run worker (or any driver a service starts) must attach
    # to the head the settings name, not one inherited from the caller's shell.
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
                **ids,
            )
        except OSError as exc:
            raise StackError(f"{spec.name}: cannot execute {launch.argv[0]}: {exc}") from None
    with _CHILDREN_LOCK:
        _CHILDREN[proc.pid] = proc
    stat = _proc_stat(proc.pid) if _HAS_PROC else None
    record = Record(
        service=spec.name,
        pid=proc.pid,
        start_ticks=stat.start_ticks if stat is not None else 0,
        boot_id=boot_id(),
        port=spec.port(settings),
        argv=launch.argv,
        log=str(log),
        started_at=time.time(),
        extra={**launch.extra, "profile": settings.profile},
    )
    write_record(settings, record)
    return record


def _wait_healthy(spec: Spec, settings: Settings, record: Record, cancel: threading.Event) -> None:
    timeout = spec.start_timeout
    deadline = time.monotonic() + timeout
    delay = 0.05
    while True:
        try:
            reason = spec.check(settings)
        except FatalHealth as exc:
            cause = str(exc).removeprefix(f"{spec.name}: ")
            raise StackError(_failure(spec.name, cause, settings, record)) from None
        if reason is None:
            return
        if cancel.is_set():
            raise StackError(f"{spec.name}: interrupted while waiting for it to become healthy")
        if not leader_alive(record):
            raise _ExitedDuringStartup(
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
    spec: Spec, settings: Settings, plan: _Plan, say: Progress, cancel: threading.Event
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
    try:
        if plan.kind == "start":
            assert plan.launch is not None
            port = spec.port(settings)
            where = f" on {settings.host}:{port}" if port else ""
            say(f"{name}: starting{where} (log: {log})")
            record = _start(spec, settings, plan.launch)
        assert record is not None
        if plan.kind in ("start", "wait"):
            if plan.kind == "wait":
                say(f"{name}: pid {record.pid} is running but not healthy yet; waiting")
            retries = spec.start_retries if plan.kind == "start" else 0
            while True:
                try:
                    _wait_healthy(spec, settings, record, cancel)
                    break
                except _ExitedDuringStartup:
                    if retries == 0 or spec.launch is None:
                        raise
                    retries -= 1
                    say(f"{name}: process {record.pid} exited during startup; starting it again")
                    _terminate(spec, record)  # what is left of its session
                    record = _start(spec, settings, spec.launch(settings))
        if spec.ready is not None:
            try:
                message = spec.ready(settings)
            except Exception as exc:
                raise StackError(
                    _failure(name, f"healthy, but getting it ready failed: {exc}", settings)
                ) from None
            if message:
                say(f"{name}: {message}")
    except BaseException:
        if plan.kind == "start" and record is not None:
            # Do not leave a broken process behind as 'unhealthy'; its log stays.
            _terminate(spec, record)
            _remove_record(settings, name)
        raise
    elapsed = time.monotonic() - started
    detail = "already running" if plan.kind == "running" else f"healthy after {elapsed:.1f} s"
    say(f"{name}: {detail} (pid {record.pid})")
    return ServiceStatus(name, "running", url, record.pid, log, links, detail)


def waves(specs: Sequence[Spec]) -> list[list[Spec]]:
    """The specs in start order: each wave holds the services whose `needs` (among `specs`)
    are all in earlier waves."""
    names = {spec.name for spec in specs}
    level: dict[str, int] = {}

    def depth(spec: Spec, seen: tuple[str, ...] = ()) -> int:
        if spec.name in level:
            return level[spec.name]
        if spec.name in seen:
            raise StackError(f"{spec.name}: circular `needs`: {' -> '.join((*seen, spec.name))}")
        by_name = {s.name: s for s in specs}
        needed = [by_name[n] for n in spec.needs if n in names]
        level[spec.name] = 1 + max((depth(n, (*seen, spec.name)) for n in needed), default=-1)
        return level[spec.name]

    for spec in specs:
        depth(spec)
    result: list[list[Spec]] = [[] for _ in range(max(level.values(), default=-1) + 1)]
    for spec in specs:
        result[level[spec.name]].append(spec)
    return result


def up(
    settings: Settings,
    specs: Sequence[Spec],
    *,
    progress: Progress | None = None,
) -> list[ServiceStatus]:
    """Start `specs` and wait until they are healthy, each once the services it `needs` are.

    Idempotent: services already running and healthy are left alone; external ones are only
    health-checked. Raises StackError naming each failed service and the cause; conflicts
    found before starting (busy port, missing binary, a config `nginx -t` rejects) leave
    nothing started. A failed service is stopped (its log stays) and what needs it does not
    start; healthy services stay up, so a second `up` continues. `progress` receives one-line
    messages, serialized, from worker threads.
    """
    startable = [spec for spec in specs if not spec.observed()]
    say = _serialized(progress)
    with _locked(settings, say):
        plans: dict[str, _Plan] = {}
        errors: list[str] = []
        for spec in startable:
            try:
                plans[spec.name] = _plan(spec, settings, say)
            except StackError as exc:
                errors.append(str(exc))
        errors += _duplicate_ports(
            settings, [s for s in startable if s.name in plans and plans[s.name].kind == "start"]
        )
        if errors:
            raise StackError("; ".join(errors))

        # Each service starts as soon as the services it needs are healthy (not a whole wave
        # later: MLflow need not wait for Ray). Set on Ctrl-C so the workers stop waiting and
        # stop what they started, instead of the pool blocking the interrupt for minutes.
        cancel = threading.Event()
        names = {spec.name for spec in startable}
        futures: dict[str, Future[ServiceStatus]] = {}

        def bring_up_after_needs(spec: Spec) -> ServiceStatus:
            for need in spec.needs:
                if need in names:
                    try:
                        futures[need].result()
                    except BaseException:
                        raise _NotStarted(f"{spec.name}: not started, {need} failed") from None
            return _bring_up(spec, settings, plans[spec.name], say, cancel)

        ordered = [spec for wave in waves(startable) for spec in wave]
        with ThreadPoolExecutor(
            max_workers=len(ordered) or 1, thread_name_prefix="easymlops-up"
        ) as pool:
            # In wave order, so a service's needs are submitted (in `futures`) before it.
            for spec in ordered:
                futures[spec.name] = pool.submit(bring_up_after_needs, spec)
            results: dict[str, ServiceStatus] = {}
            failures: list[str] = []
            try:
                for name, future in futures.items():
                    try:
                        results[name] = future.result()
                    except _NotStarted:
                        pass  # the failure of what it needs is reported
                    except StackError as exc:
                        failures.append(str(exc))
                    except Exception as exc:  # a bug or an OS error: still name the service
                        failures.append(f"{name}: {type(exc).__name__}: {exc}")
            except BaseException:
                cancel.set()
                raise
        if failures:
            raise StackError("\n\n".join(failures))
        return [results[spec.name] for spec in startable]


# ---- down -------------------------------------------------------------------------------------


def _bring_down(spec: Spec, settings: Settings, say: Progress) -> bool:
    record = read_record(settings, spec.name)
    if record is None:
        return False
    stopped = _terminate(spec, record)
    _remove_record(settings, spec.name)
    if spec.after_stop is not None:
        spec.after_stop(settings, record)
    if stopped:
        say(f"{spec.name}: stopped (pid {record.pid})")
    return stopped


def down(
    settings: Settings, specs: Sequence[Spec], *, progress: Progress | None = None
) -> list[str]:
    """Stop what `up` started in this home among `specs`; returns the names stopped, in spec
    order. Waves stop in reverse (Dagster before the PostgreSQL it writes to).

    Only the processes of a recorded launch (its session) are signalled (stop signal, then
    SIGKILL after a grace period); pid files are removed. Idempotent: with nothing recorded
    it is a no-op. Services we did not start (external ones, someone else's) are untouched.
    """
    say = _serialized(progress)
    if not run_dir(settings).is_dir():
        return []
    stopped: set[str] = set()
    # A service that fails to stop does not keep the next waves running: every wave is brought
    # down, then the failures are raised together.
    failures: list[str] = []
    with _locked(settings, say):
        recorded = [s for s in specs if not s.observed() and read_record(settings, s.name)]
        for wave in reversed(waves(recorded)):
            with ThreadPoolExecutor(
                max_workers=len(wave), thread_name_prefix="easymlops-down"
            ) as pool:
                futures = {s.name: pool.submit(_bring_down, s, settings, say) for s in wave}
                for name, future in futures.items():
                    try:
                        if future.result():
                            stopped.add(name)
                    except Exception as exc:  # reported below, with its name
                        failures.append(f"{name}: {exc}")
    if failures:
        done = ", ".join(spec.name for spec in specs if spec.name in stopped) or "nothing"
        raise StackError(f"stopping failed for {'; '.join(failures)} (stopped: {done})")
    return [spec.name for spec in specs if spec.name in stopped]


# ---- status -----------------------------------------------------------------------------------


def _status_one(spec: Spec, settings: Settings) -> ServiceStatus:
    name = spec.name
    url, links, log = spec.url(settings), spec.links(settings), log_path(settings, name)

    def check() -> str | None:
        try:
            return spec.check(settings)
        except FatalHealth as exc:
            return str(exc).removeprefix(f"{name}: ")

    if spec.observed():
        reason = check()
        state: State = "running" if reason is None else "stopped"
        return ServiceStatus(name, state, url, links=links, detail=reason or "")
    if spec.external(settings):
        reason = check()
        return ServiceStatus(
            name, "external", url, links=links, detail="healthy" if reason is None else reason
        )
    record = read_record(settings, name)
    if record is not None and leader_alive(record):
        reason = check()
        if reason is None:
            return ServiceStatus(name, "running", url, record.pid, log, links)
        return ServiceStatus(name, "unhealthy", url, record.pid, log, links, reason)
    detail = ""
    port = spec.port(settings)
    if port and not port_free(settings.host, port):
        detail = f"port {port} is in use by another process"
    return ServiceStatus(name, "stopped", url, None, log if log.exists() else None, links, detail)


def status(settings: Settings, specs: Sequence[Spec]) -> list[ServiceStatus]:
    """Report each of `specs` without changing anything: 'running' (ours and healthy),
    'unhealthy' (ours, alive, failing its check), 'stopped', or 'external' (detail says
    whether it answers)."""
    with ThreadPoolExecutor(
        max_workers=len(specs) or 1, thread_name_prefix="easymlops-status"
    ) as pool:
        return list(pool.map(lambda spec: _status_one(spec, settings), specs))


def recorded(settings: Settings, specs: Mapping[str, Spec]) -> list[str]:
    """The services with a launch recorded in this home (running or not)."""
    return [name for name in specs if read_record(settings, name) is not None]


def _serialized(progress: Progress | None) -> Progress:
    """Progress callbacks come from worker threads; serialize them for the caller."""
    lock = threading.Lock()

    def say(message: str) -> None:
        if progress is not None:
            with lock:
                progress(message)

    return say
