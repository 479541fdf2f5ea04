"""A warm dbt: `easymlops-dbt` runs the dbt CLI forked from a server that imported dbt once.

A dbt CLI start costs ~4 s on 2 cores before dbt does anything: ~3.4 s importing dbt-core (most
of it its dataclasses' serializer code generation) and ~0.8 s registering the adapter. A
one-date backfill runs three dbt steps, and the gold models' own SQL takes 1-3.5 s of each.

dagster-dbt runs dbt as a subprocess and reads its JSON log lines from stdout; that contract is
kept. `easymlops-dbt` (the `dbt_executable` of the platform's DbtCliResource) is a small client:

1. it connects to the server's Unix socket, starting the server if none answers;
2. it sends its arguments, working directory, environment and umask, and its stdin, stdout and
   stderr file descriptors (SCM_RIGHTS);
3. the server forks; the child takes those descriptors, directory and environment, and runs
   dbt's own CLI entry point, so dbt's output goes straight to the client's pipes;
4. the client relays SIGINT/SIGTERM to the child and exits with the child's exit code.

Each dbt run is still a process of its own: its global state (flags, adapters, connections)
starts from the server's import-only state and dies with it. The server imports modules and
nothing else: it never runs dbt, holds no connection and opens no file of a project. It is
started with a minimal environment (no secrets from the first client), exits after
`IDLE_SECONDS` without work, and its socket lives in a directory only this user can enter.
The socket's name carries a key of the interpreter and the installed packages, so after
`uv sync` a new server starts and the old one idles out.

When no server can be reached or started, the client says why on stderr and runs the real
`dbt` instead: slower, never wrong.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

# How long a server with nothing to do stays up.
IDLE_SECONDS = float(os.environ.get("EASYMLOPS_DBT_FORKSERVER_IDLE_SECONDS", "300"))
# How long a client waits for a server it started to listen (an import of dbt: ~4 s on a quiet
# machine, several times that on a busy one).
START_TIMEOUT = 60.0
# What the server imports: the CLI, both adapters the platform uses, and the tasks and modules
# a `dbt build` imports only when it runs (found by diffing sys.modules around one).
PRELOAD = (
    "dbt.cli.main",
    "dbt.adapters.duckdb",
    "dbt.adapters.duckdb.impl",
    "dbt.adapters.postgres",
    "dbt.adapters.postgres.impl",
    "dbt.task.build",
    "dbt.task.run",
    "dbt.task.test",
    "dbt.task.list",
    "dbt.task.show",
    "dbt.task.run_operation",
    "dbt.compilation",
    "sqlparse",
    "multiprocessing.dummy",
)
HEADER = struct.Struct("!I")


class ForkServerUnavailable(RuntimeError):
    """No server answers and none could be started; the message says why."""


# ---- where the server lives -----------------------------------------------------------------


def socket_dir() -> Path:
    """A directory of this user's only: a socket elsewhere could be another user's server, which
    would receive our environment (database passwords, S3 keys)."""
    configured = os.environ.get("EASYMLOPS_DBT_FORKSERVER_DIR")
    path = Path(configured) if configured else Path(f"/tmp/easymlops-dbt-{os.getuid()}")
    path.mkdir(mode=0o700, exist_ok=True)
    info = path.stat()
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise ForkServerUnavailable(
            f"{path} must belong to uid {os.getuid()} and be private (mode 0700), "
            f"it is uid {info.st_uid}, mode {info.st_mode & 0o777:o}"
        )
    return path


def server_key() -> str:
    """Changes when the interpreter or any installed package changes (installing, upgrading or
    removing one changes site-packages' entries, hence its mtime) or when this module does."""
    parts = [
        sys.executable,
        str(os.stat(sysconfig.get_paths()["purelib"]).st_mtime_ns),
        str(os.stat(__file__).st_mtime_ns),
    ]
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def socket_path() -> Path:
    return socket_dir() / f"{server_key()}.sock"


def server_pids(directory: Path) -> list[int]:
    """Servers listening in `directory` (their command line names their socket there). Their
    dbt runs, forked, have the same command line and are left out."""
    found: dict[int, int] = {}  # pid -> parent pid
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            parent = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if cmdline[1:4] == [b"-m", b"easymlops.dbt_forkserver", b"serve"] and Path(
            cmdline[4].decode()
        ).parent == Path(directory):
            found[int(proc.name)] = parent
    return sorted(pid for pid, parent in found.items() if parent not in found)


def stop_servers(directory: Path) -> list[int]:
    """Ask the servers of `directory` to stop: each exits once its running commands end."""
    pids = server_pids(directory)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    return pids


# ---- server ---------------------------------------------------------------------------------


def serve(path: Path, idle_seconds: float = IDLE_SECONDS) -> None:
    """Import dbt, then fork a dbt run per request until idle for `idle_seconds`."""
    import fcntl

    lock = open(path.with_suffix(".lock"), "w")  # noqa: SIM115 - held for the server's life
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            # Another server has the lock: it serves (then so be it), is still importing, or
            # is stopping after its idle time (then the lock frees soon).
            try:
                _connect(path).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise ForkServerUnavailable(f"{path}: locked, yet nobody listens") from None
                time.sleep(0.1)
    started = time.monotonic()
    for module in PRELOAD:
        __import__(module)
    log(f"imported dbt in {time.monotonic() - started:.1f} s; listening on {path}")
    path.unlink(missing_ok=True)  # a socket left by a server that was killed
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(16)
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    running: dict[int, socket.socket] = {}  # child pid -> its client's connection
    clients: dict[int, int] = {}  # connection fd -> child pid
    last_work = time.monotonic()
    # SIGTERM: accept nothing more, let the running commands finish (their clients wait for
    # their exit codes), then exit. A new command meanwhile starts a new server, which takes
    # over once this one has let go of the lock.
    stop_requested = False

    def request_stop(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, request_stop)
    listening = True
    try:
        while running or (not stop_requested and time.monotonic() - last_work < idle_seconds):
            if stop_requested and listening:
                selector.unregister(listener)
                listener.close()
                path.unlink(missing_ok=True)
                listening = False
                log(f"stopping: waiting for {len(running)} dbt command(s)")
            for key, _ in selector.select(timeout=0.2):
                if key.fileobj is listener:
                    conn, _ = listener.accept()
                    last_work = time.monotonic()
                    pid = _fork_run(conn, listener)
                    if pid is None:
                        conn.close()
                        continue
                    running[pid] = conn
                    clients[conn.fileno()] = pid
                    selector.register(conn, selectors.EVENT_READ)
                else:
                    # A client's connection is readable only when it closed: its client died
                    # (killed with -9 after a cancel). Its dbt must not go on writing alone.
                    gone = key.fileobj
                    assert isinstance(gone, socket.socket)
                    pid = clients.pop(gone.fileno())
                    selector.unregister(gone)
                    log(f"client of dbt pid {pid} went away; killing its process group")
                    _kill_group(pid)
            for pid, code in _reap():
                if pid not in running:
                    continue
                ended = running.pop(pid)
                if ended.fileno() in clients:
                    clients.pop(ended.fileno())
                    selector.unregister(ended)
                    with contextlib.suppress(OSError):
                        ended.sendall(f"exit {code}\n".encode())
                ended.close()
                last_work = time.monotonic()
                log(f"dbt pid {pid} exited {code}")
    finally:
        if listening:
            listener.close()
            path.unlink(missing_ok=True)
        log("stopped" if stop_requested else "idle; stopped")


def _fork_run(conn: socket.socket, listener: socket.socket) -> int | None:
    """Read one request and fork its dbt run; returns the child's pid."""
    conn.settimeout(10)
    try:
        header, fds, _, _ = socket.recv_fds(conn, HEADER.size, 3)
        if len(header) != HEADER.size or len(fds) != 3:
            raise ValueError(f"bad request header ({len(header)} bytes, {len(fds)} fds)")
        (size,) = HEADER.unpack(header)
        body = _recv_exactly(conn, size)
        request = json.loads(body)
    except (OSError, ValueError) as exc:
        log(f"dropped a request: {exc}")
        return None
    conn.settimeout(None)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the dbt run
        listener.close()
        _run_dbt(conn, fds, request)  # never returns
    for fd in fds:
        os.close(fd)
    # The command only: --vars and --inline could hold what a log should not.
    command = request["argv"][0] if request["argv"] else ""
    log(f"dbt pid {pid}: dbt {command} (in {request['cwd']})")
    conn.sendall(f"pid {pid}\n".encode())
    return pid


def _run_dbt(conn: socket.socket, fds: list[int], request: dict[str, Any]) -> None:
    code = 1
    try:
        os.setpgid(0, 0)  # its own group: the server can stop it with whatever it started
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        # Nothing else of the server's: not the lock (a dbt run outliving a killed server
        # would keep a new one from starting), nor other clients' connections (their clients
        # would not see the server go away).
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        os.chdir(request["cwd"])
        os.umask(request["umask"])
        os.environ.clear()
        os.environ.update(request["env"])
        sys.argv = ["dbt", *request["argv"]]
        # The parent's sys.stdout was opened before the client's pipe was dup'ed onto fd 1;
        # line buffering lets dagster-dbt read each JSON log line as dbt writes it.
        assert isinstance(sys.stdout, io.TextIOWrapper)
        sys.stdout.reconfigure(line_buffering=True)
        from dbt.cli.main import cli

        try:
            cli.main(args=request["argv"], prog_name="dbt", standalone_mode=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        except KeyboardInterrupt:
            code = 130
    except BaseException as exc:
        print(f"easymlops-dbt: the forked dbt failed: {exc!r}", file=sys.stderr)
        code = 1
    finally:
        # What a normal exit runs (logging's flush, multiprocessing's finalizers, which release
        # dbt's semaphores), then exit without the parent's other cleanup.
        import atexit

        try:
            atexit._run_exitfuncs()
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def _recv_exactly(conn: socket.socket, size: int) -> bytes:
    chunks = []
    while size:
        chunk = conn.recv(min(size, 1 << 16))
        if not chunk:
            raise ValueError("the client closed the connection mid-request")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _reap() -> list[tuple[int, int]]:
    done: list[tuple[int, int]] = []
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return done
        if pid == 0:
            return done
        done.append((pid, os.waitstatus_to_exitcode(status)))


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


# ---- client ---------------------------------------------------------------------------------


def connect(path: Path) -> socket.socket:
    """A connection to the server at `path`, starting one if none answers."""
    try:
        return _connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        pass
    log_path = path.with_suffix(".log")
    with open(log_path, "ab") as log_file:
        # A minimal environment: the server must not carry the first client's secrets, and
        # each run gets its client's environment anyway.
        keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "EASYMLOPS_DBT_FORKSERVER_IDLE_SECONDS")
        server = subprocess.Popen(
            [sys.executable, "-m", "easymlops.dbt_forkserver", "serve", str(path)],
            env={k: os.environ[k] for k in keep if k in os.environ} | {"PYTHONUNBUFFERED": "1"},
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=log_file,
            start_new_session=True,
        )
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            return _connect(path)
        except (FileNotFoundError, ConnectionRefusedError):
            # exit 0: another client's server holds the lock and is still importing
            if server.poll() not in (None, 0):
                raise ForkServerUnavailable(
                    f"the dbt fork server exited with {server.returncode}; see {log_path}"
                ) from None
            if time.monotonic() > deadline:
                raise ForkServerUnavailable(
                    f"no dbt fork server listened on {path} within {START_TIMEOUT:g} s; "
                    f"see {log_path}"
                ) from None
            time.sleep(0.05)


def _connect(path: Path) -> socket.socket:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(str(path))
    except OSError:
        conn.close()
        raise
    return conn


def run_forked(argv: list[str]) -> int:
    """Run `dbt argv` forked from the server; returns its exit code."""
    conn = connect(socket_path())
    umask = os.umask(0)
    os.umask(umask)
    body = json.dumps(
        {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ), "umask": umask}
    ).encode()
    socket.send_fds(conn, [HEADER.pack(len(body))], [0, 1, 2])
    conn.sendall(body)
    replies = conn.makefile("r")
    first = replies.readline().split()
    if len(first) != 2 or first[0] != "pid":
        raise ForkServerUnavailable(f"the dbt fork server did not start the run ({first!r})")
    child = int(first[1])

    def relay(signum: int, _frame: object) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signum)

    signal.signal(signal.SIGINT, relay)
    signal.signal(signal.SIGTERM, relay)
    last = replies.readline().split()
    if len(last) != 2 or last[0] != "exit":
        print("easymlops-dbt: the fork server closed without dbt's exit code", file=sys.stderr)
        return 1
    code = int(last[1])
    return code if code >= 0 else 128 - code  # killed by a signal: the shell's convention


def client() -> None:
    """`easymlops-dbt ARGS`: what `dbt ARGS` does, without dbt's start-up."""
    argv = sys.argv[1:]
    try:
        code = run_forked(argv)
    except (ForkServerUnavailable, OSError) as exc:
        real_dbt = str(Path(sys.executable).parent / "dbt")
        print(f"easymlops-dbt: running {real_dbt} itself: {exc}", file=sys.stderr, flush=True)
        os.execv(real_dbt, [real_dbt, *argv])
    sys.exit(code)


if __name__ == "__main__":
    if sys.argv[1:2] == ["serve"] and len(sys.argv) == 3:
        serve(Path(sys.argv[2]))
    else:
        sys.exit("usage: python -m easymlops.dbt_forkserver serve SOCKET_PATH")
