"""NGINX in front of the serving app (infra/nginx/, easymlops.nginx): a real nginx on loopback,
started by the stack supervisor (`up(services=["nginx"])`) in a home of each test's own, in
front of bare uvicorn servers of the serving app (`python -m serving.bare`, the same code as the
Serve replicas) that score with a promoted model from the session stack's MLflow."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import free_port
from typer.testing import CliRunner

from easymlops import registry
from easymlops import stack as stack_module
from easymlops.cli import app
from easymlops.settings import Settings, get_settings
from tests.test_registry import tiny_booster
from tests.test_stack import gone

pytestmark = pytest.mark.services

ROOT = Path(__file__).resolve().parent.parent
MODEL_NAME = "test_nginx_model"
BODY = {"user_id": 31, "product_id": 41, "user_session": "nginx-test", "price": 5.0}


# ---- upstreams ---------------------------------------------------------------------------------


@dataclass
class Bare:
    """One `python -m serving.bare` server."""

    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def start_bare(log_dir: Path) -> Bare:
    port = free_port()
    log = log_dir / f"bare-{port}.log"
    env = os.environ | {
        "EASYMLOPS_MODEL_NAME": MODEL_NAME,
        # Not into the session's predictions topic, which other tests read.
        "EASYMLOPS_SERVE_LOG_PREDICTIONS": "false",
    }
    with open(log, "wb") as handle:
        process = subprocess.Popen(
            [sys.executable, "-m", "serving.bare", "--port", str(port)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
        )
    return Bare(port, process, log)


def wait_ready(bare: Bare, timeout: float = 180.0) -> None:
    """Until /readyz answers 200: the server runs and has loaded the champion."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if bare.process.poll() is not None:
            raise AssertionError(f"bare server exited: {bare.log.read_text()[-3000:]}")
        try:
            if httpx.get(f"http://{bare.address}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise AssertionError(
        f"bare server not ready in {timeout:.0f} s: {bare.log.read_text()[-3000:]}"
    )


def stop_bare(bare: Bare) -> None:
    if bare.process.poll() is None:
        bare.process.terminate()
        try:
            bare.process.wait(15)
        except subprocess.TimeoutExpired:
            bare.process.kill()
            bare.process.wait(15)


@dataclass
class Upstreams:
    primary: Bare
    backup: Bare
    victim: Bare  # a primary of its own for the failover test, which kills it


@pytest.fixture(scope="module")
def upstreams(stack: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstreams]:
    settings = stack.model_copy(update={"model_name": MODEL_NAME})
    booster, _ = tiny_booster(11)
    version = registry.log_and_register(booster, params={}, metrics={}, settings=settings)
    registry.promote(version.version, settings)
    log_dir = tmp_path_factory.mktemp("bare")
    servers = [start_bare(log_dir) for _ in range(3)]  # started together: each takes seconds
    try:
        for bare in servers:
            wait_ready(bare)
        yield Upstreams(*servers)
    finally:
        for bare in servers:
            stop_bare(bare)


# ---- nginx -------------------------------------------------------------------------------------


@contextmanager
def nginx_in_front(
    stack: Settings, home: Path, primary: Bare, **overrides: Any
) -> Iterator[Settings]:
    """nginx on a free port in front of `primary`, started and stopped by the supervisor."""
    settings = stack.model_copy(
        update={"home": home, "serve_port": primary.port, "nginx_port": free_port(), **overrides}
    )
    [status] = stack_module.up(settings, services=["nginx"])
    assert status.state == "running", status
    try:
        yield settings
    finally:
        stack_module.down(settings, services=["nginx"])


def url(settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.nginx_port}"


def log_lines(settings: Settings) -> list[dict[str, Any]]:
    """Every access log line, parsed: a line that is not JSON fails the test here."""
    text = stack_module.log_path(settings, "nginx-access").read_text()
    return [json.loads(line) for line in text.splitlines()]


def log_line(settings: Settings, request_id: str) -> dict[str, Any]:
    """The line of one request (nginx writes it just after the response, so allow a moment)."""
    deadline = time.monotonic() + 5
    while True:
        found = [line for line in log_lines(settings) if line["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            assert len(found) == 1, f"{request_id}: {found}"
            return found[0]
        time.sleep(0.05)


def last_upstream(line: dict[str, Any]) -> str:
    return str(line["upstream_addr"]).split(",")[-1].strip()


# ---- the service -------------------------------------------------------------------------------


def test_up_starts_nginx_in_front_and_down_stops_it(
    stack: Settings, upstreams: Upstreams, tmp_path: Path
) -> None:
    settings = stack.model_copy(
        update={"home": tmp_path, "serve_port": upstreams.primary.port, "nginx_port": free_port()}
    )
    [started] = stack_module.up(settings, services=["nginx"])
    try:
        assert (started.name, started.state, started.url) == ("nginx", "running", url(settings))
        assert started.pid is not None
        assert httpx.get(f"{url(settings)}/-/nginx-healthz").json() == {"status": "alive"}
        response = httpx.post(f"{url(settings)}/predict", json=BODY)
        assert response.status_code == 200, response.text
        assert response.json()["model_name"] == MODEL_NAME

        # Optional: reported once started, by name among the others.
        statuses = {s.name: s for s in stack_module.status(settings)}
        assert list(statuses) == [*stack_module.SERVICES, "nginx"]
        assert (statuses["nginx"].state, statuses["nginx"].pid) == ("running", started.pid)
        again = stack_module.up(settings, services=["nginx"])
        assert again[0].detail == "already running"
    finally:
        stopped = stack_module.down(settings)
    assert stopped == ["nginx"]
    assert started.pid is not None and gone(started.pid)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{url(settings)}/-/nginx-healthz")
    assert list(s.name for s in stack_module.status(settings)) == list(stack_module.SERVICES)


def test_cli_up_with_nginx(stack: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """`easymlops up --with-nginx` on the session stack: the rest is already up, nginx starts."""
    port = free_port()
    monkeypatch.setenv("EASYMLOPS_NGINX_PORT", str(port))
    get_settings.cache_clear()
    runner = CliRunner()
    try:
        result = runner.invoke(app, ["up", "--with-nginx"])
        assert result.exit_code == 0, result.output
        [line] = [line for line in result.stdout.splitlines() if " nginx " in line]
        assert line.split() == ["running", "nginx", f"http://127.0.0.1:{port}"]
        status = runner.invoke(app, ["status", "--json"])
        services = {s["name"]: s for s in json.loads(status.stdout)}
        assert services["nginx"]["state"] == "running"
        assert services["kafka"]["state"] == "running"
    finally:
        stack_module.down(get_settings(), services=["nginx"])
        monkeypatch.undo()
        get_settings.cache_clear()


def test_a_config_nginx_rejects_names_the_cause_and_starts_nothing(
    stack: Settings, tmp_path: Path
) -> None:
    settings = stack.model_copy(
        update={
            "home": tmp_path,
            "nginx_port": free_port(),
            "nginx_backup_upstream": "no-such-host.invalid:8000",
        }
    )
    with pytest.raises(stack_module.StackError) as caught:
        stack_module.up(settings, services=["nginx"])
    message = str(caught.value)
    assert message.startswith("nginx: `nginx -t` rejected")
    assert 'host not found in upstream "no-such-host.invalid:8000"' in message
    assert not (tmp_path / "run" / "nginx.json").exists()

    # A value that would end the `server` line and add directives is refused before nginx -t.
    sneaky = settings.model_copy(update={"nginx_backup_upstream": "127.0.0.1:1; return 200"})
    with pytest.raises(stack_module.StackError, match="must be host:port"):
        stack_module.up(sneaky, services=["nginx"])


# ---- what nginx does in front ------------------------------------------------------------------


def test_a_body_over_the_limit_is_refused_by_nginx_before_the_app(
    stack: Settings, upstreams: Upstreams, tmp_path: Path
) -> None:
    # Lower than the bare servers' limit (and nginx's default of 1 MiB), so a body the app would
    # take shows that nginx itself applies serve_max_body_bytes.
    limit = 200_000
    assert stack.serve_max_body_bytes > limit
    empty = json.dumps(BODY | {"pad": ""}).encode()
    at_limit = json.dumps(BODY | {"pad": "x" * (limit - len(empty))}).encode()
    assert len(at_limit) == limit
    headers = {"content-type": "application/json"}
    direct = httpx.post(
        f"http://{upstreams.primary.address}/predict", content=at_limit + b" ", headers=headers
    )
    assert direct.status_code == 200, direct.text
    with (
        nginx_in_front(stack, tmp_path, upstreams.primary, serve_max_body_bytes=limit) as settings,
        httpx.Client(base_url=url(settings), timeout=30) as http,
    ):
        # Exactly at the limit: nginx lets it through and the app scores it (not stricter).
        passed = http.post("/predict", content=at_limit, headers=headers)
        assert passed.status_code == 200, passed.text
        assert "x-trace-id" in passed.headers

        refused = http.post("/predict", content=at_limit + b" ", headers=headers)
        assert refused.status_code == 413
        assert "EASYMLOPS_SERVE_MAX_BODY_BYTES" in refused.json()["detail"]
        # The app adds x-trace-id to every answer, its own 413 included: it never saw this.
        assert "x-trace-id" not in refused.headers
        line = log_line(settings, refused.headers["x-request-id"])
        assert (line["status"], line["upstream_addr"]) == (413, "")

        # A chunked body (no Content-Length) is counted as it arrives.
        def chunks() -> Iterator[bytes]:
            for start in range(0, len(at_limit) + 1, 65536):
                yield (at_limit + b" ")[start : start + 65536]

        chunked = http.post("/predict", content=chunks(), headers=headers)
        assert chunked.status_code == 413
        assert "x-trace-id" not in chunked.headers


def test_a_burst_beyond_the_rate_limit_gets_429_per_client(
    stack: Settings, upstreams: Upstreams, tmp_path: Path
) -> None:
    rate, burst = 2, 3
    with (
        nginx_in_front(
            stack,
            tmp_path,
            upstreams.primary,
            nginx_rate_per_second=rate,
            nginx_rate_burst=burst,
        ) as settings,
        httpx.Client(base_url=url(settings), timeout=10) as client_a,
        httpx.Client(
            base_url=url(settings),
            timeout=10,
            # Another address on loopback: another client for nginx.
            transport=httpx.HTTPTransport(local_address="127.0.0.2"),
        ) as client_b,
    ):
        responses = [client_a.post("/predict", json=BODY) for _ in range(12)]
        statuses = [r.status_code for r in responses]
        # Within rate + burst: answered by the app; beyond: 429 from nginx (a token refills
        # every 1/rate s, so at most one more gets through while the burst is sent).
        assert statuses[: burst + 1] == [200] * (burst + 1), statuses
        assert set(statuses) <= {200, 429}, statuses
        assert statuses.count(429) >= 12 - (burst + 2), statuses
        for response in responses:
            assert ("x-trace-id" in response.headers) == (response.status_code == 200)
        limited = next(r for r in responses if r.status_code == 429)
        assert "EASYMLOPS_NGINX_RATE_PER_SECOND" in limited.json()["detail"]

        # The limit is per client address: another client is served at once.
        other = client_b.post("/predict", json=BODY)
        assert other.status_code == 200, other.text
        assert log_line(settings, other.headers["x-request-id"])["remote_addr"] == "127.0.0.2"
        # Liveness probes are never limited.
        assert client_a.get("/healthz").status_code == 200
        # And the first client is served again once a token has refilled.
        time.sleep(1.5 / rate)
        assert client_a.post("/predict", json=BODY).status_code == 200


def test_the_json_access_log_carries_the_request_id_the_app_saw(
    stack: Settings, upstreams: Upstreams, tmp_path: Path
) -> None:
    with (
        nginx_in_front(stack, tmp_path, upstreams.primary) as settings,
        httpx.Client(base_url=url(settings), timeout=10) as http,
    ):
        response = http.post("/predict", json=BODY)
        assert response.status_code == 200, response.text
        request_id = response.headers["x-request-id"]
        assert len(request_id) == 32
        # nginx sent the request id as the trace id of the traceparent; the app continued that
        # trace and answered with its id.
        assert response.headers["x-trace-id"] == request_id
        assert response.headers["traceparent"].startswith(f"00-{request_id}-")

        line = log_line(settings, request_id)
        assert line["trace_id"] == request_id
        assert (line["method"], line["uri"], line["status"]) == ("POST", "/predict", 200)
        assert line["upstream_addr"] == upstreams.primary.address
        assert line["upstream_status"] == "200"
        assert line["remote_addr"] == "127.0.0.1"
        # Both in whole milliseconds, from different clock reads: $request_time starts at the
        # event loop's cached time, so it may round one millisecond below the upstream's (CI
        # saw 0.005 against 0.006).
        upstream_time = float(line["upstream_response_time"])
        assert upstream_time >= 0
        assert line["request_time"] >= upstream_time - 0.001
        assert datetime.fromisoformat(line["time"]).tzinfo is not None

        # A client's own trace is continued instead; the line names both ids.
        trace_id = uuid.uuid4().hex
        traced = http.post(
            "/predict", json=BODY, headers={"traceparent": f"00-{trace_id}-{'1' * 16}-01"}
        )
        assert traced.status_code == 200, traced.text
        assert traced.headers["x-trace-id"] == trace_id
        line = log_line(settings, traced.headers["x-request-id"])
        assert line["trace_id"] == trace_id != line["request_id"]


def peer_ports(port: int) -> set[int]:
    """The client-side ports of the TCP connections with `port` on this machine that the kernel
    still knows: open ones and closed ones in TIME_WAIT (60 s), so a snapshot after a run of
    requests sees every connection they opened."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, remote, state, *_ = line.split()
        local_port, remote_port = int(local.split(":")[1], 16), int(remote.split(":")[1], 16)
        if state == "0A":  # LISTEN
            continue
        if local_port == port:
            found.add(remote_port)
        elif remote_port == port:
            found.add(local_port)
    return found


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[-1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                found.append(int(entry.name))
    return found


def test_connections_to_the_upstream_are_kept_alive(
    stack: Settings, upstreams: Upstreams, tmp_path: Path
) -> None:
    requests = 30
    with nginx_in_front(stack, tmp_path, upstreams.primary) as settings:
        record = json.loads((tmp_path / "run" / "nginx.json").read_text())
        workers = len(children(record["pid"]))
        assert workers >= 1
        before = peer_ports(upstreams.primary.port)
        for _ in range(requests):
            # A new client connection each time: only nginx's side can reuse connections.
            response = httpx.post(f"{url(settings)}/predict", json=BODY, timeout=10)
            assert response.status_code == 200, response.text
        opened = peer_ports(upstreams.primary.port) - before
    # Each worker opens one connection and reuses it; without keep-alive it would be 30.
    assert 1 <= len(opened) <= workers, (opened, workers)


def test_a_killed_primary_fails_over_to_the_backup_without_client_errors(
    stack: Settings, upstreams: Upstreams, tmp_path: Path
) -> None:
    primary, backup = upstreams.victim, upstreams.backup
    with nginx_in_front(
        stack,
        tmp_path,
        primary,
        nginx_backup_upstream=backup.address,
        nginx_rate_per_second=100_000,
    ) as settings:
        for _ in range(5):
            response = httpx.post(f"{url(settings)}/predict", json=BODY, timeout=10)
            assert response.status_code == 200, response.text
            line = log_line(settings, response.headers["x-request-id"])
            assert line["upstream_addr"] == primary.address  # the backup idles while it lives

        # Clients keep sending while the primary is killed, so requests are in flight.
        stop = threading.Event()
        answered: list[tuple[float, int, str]] = []
        # A response the primary had begun to write when it died: nginx has already passed
        # its status line and headers on, so it cannot re-send the request, and the client
        # gets the response cut off. Only a request in flight at the kill can meet this.
        cut_off: list[tuple[float, str]] = []

        def client() -> None:
            with httpx.Client(base_url=url(settings), timeout=10) as http:
                while not stop.is_set():
                    try:
                        reply = http.post("/predict", json=BODY)
                    except httpx.RemoteProtocolError as exc:
                        cut_off.append((time.monotonic(), str(exc)))
                        continue
                    answered.append((time.monotonic(), reply.status_code, reply.text))

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(client) for _ in range(4)]
            time.sleep(1.0)
            kill_sent = time.monotonic()
            primary.process.send_signal(signal.SIGKILL)
            primary.process.wait(10)
            killed = time.monotonic()
            time.sleep(1.5)
            stop.set()
            for future in futures:
                future.result()  # any other transport error in a client fails the test here

    errors = [(status, text) for _, status, text in answered if status != 200]
    assert errors == [], errors[:5]
    # At most the one request each client had in flight, and only at the kill.
    assert len(cut_off) <= 4, cut_off
    for at, message in cut_off:
        assert kill_sent <= at <= killed + 1.0, (at - kill_sent, message)
        assert "without sending complete message body" in message, message
    before = [t for t, _, _ in answered if t < killed]
    after = [t for t, _, _ in answered if t > killed]
    assert len(before) > 20 and len(after) > 20, (len(before), len(after))

    lines = log_lines(settings)
    assert len(lines) == 5 + len(answered) + len(cut_off)
    assert all(line["status"] == 200 for line in lines)
    # The backup answered from the kill on: some requests tried the dead primary first
    # ("primary, backup"), then the primary was out and the backup alone was asked.
    tail = lines[-20:]
    assert all(last_upstream(line) == backup.address for line in tail), tail
    failed_over = [line for line in lines if "," in line["upstream_addr"]]
    assert failed_over, "no request tried the primary and then the backup"
    for line in failed_over:
        assert line["upstream_addr"] == f"{primary.address}, {backup.address}"
        assert line["upstream_status"].endswith(", 200")
