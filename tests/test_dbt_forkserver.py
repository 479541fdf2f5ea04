"""`easymlops-dbt`, dbt's CLI forked from a server that imported dbt once
(easymlops/dbt_forkserver.py), answers as `dbt` does: same output, exit codes, environment and
working directory; it relays an interrupt, its run dies with its client, a killed server is
replaced, and where it cannot be used it runs the real dbt and says why.

Every gold-model step of the other tiers also runs through it (the platform's default), so
those tiers check its results on the real models; these tests check the process plumbing on
the real dbt project with a warehouse of their own."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from easymlops.dbt_forkserver import server_pids, stop_servers
from easymlops.warehouse import DBT_PROJECT_DIR

BIN = Path(sys.executable).parent
FORKED, REAL = str(BIN / "easymlops-dbt"), str(BIN / "dbt")
LONG_QUERY = "select count(*) from range(100000000000000)"


@pytest.fixture(scope="module")
def server_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    path = tmp_path_factory.mktemp("fs")
    path.chmod(0o700)
    yield path
    for pid in server_pids(path):
        os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def env(server_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    home = tmp_path_factory.mktemp("dbt-home")
    return os.environ | {
        "EASYMLOPS_DBT_FORKSERVER_DIR": str(server_dir),
        "EASYMLOPS_DBT_FORKSERVER_IDLE_SECONDS": "120",
        "EASYMLOPS_WAREHOUSE_PATH": str(home / "warehouse.duckdb"),
        "DBT_PROFILES_DIR": str(DBT_PROJECT_DIR),
        "DBT_TARGET_PATH": str(home / "target"),
        "DBT_LOG_PATH": str(home / "target"),
        "DBT_LOG_FORMAT": "json",
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
    }


def server_log(server_dir: Path) -> str:
    return "".join(p.read_text() for p in server_dir.glob("*.log"))


def forked_pids(server_dir: Path) -> list[int]:
    return [int(pid) for pid in re.findall(r"dbt pid (\d+): ", server_log(server_dir))]


def dbt(executable: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [executable, *args], env=env, cwd=DBT_PROJECT_DIR, capture_output=True, text=True
    )


def log_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_forked_run_answers_as_dbt_does(env: dict[str, str], server_dir: Path) -> None:
    args = ["show", "--inline", "select 42 as answer", "--output", "json"]
    real = dbt(REAL, args, env)
    first = dbt(FORKED, args, env)
    second = dbt(FORKED, args, env)
    assert real.returncode == first.returncode == second.returncode == 0, first.stdout[-2000:]

    def shown(result: subprocess.CompletedProcess) -> list[dict]:
        return [
            json.loads(line["data"]["preview"])
            for line in log_lines(result.stdout)
            if line["info"]["name"] == "ShowNode"
        ]

    assert shown(first) == shown(second) == shown(real) == [[{"answer": 42}]]
    # Both ran in processes forked by the one server (not the real dbt as a fallback), found
    # the project from the working directory and wrote where the environment said.
    forked = forked_pids(server_dir)
    run_pids = [{line["info"]["pid"] for line in log_lines(r.stdout)} for r in (first, second)]
    assert run_pids == [{forked[-2]}, {forked[-1]}]
    assert server_log(server_dir).count("imported dbt") == 1
    assert (Path(env["DBT_TARGET_PATH"]) / "run_results.json").exists()
    assert "easymlops-dbt: running" not in first.stderr + second.stderr, "fell back to dbt"


def test_exit_codes_are_dbt_s(env: dict[str, str]) -> None:
    failing_model = ["run", "--select", "stg_events", "--vars", '{"lake_root": "/nonexistent"}']
    for args, expected in (
        (failing_model, 1),  # a node failed
        (["show", "--inline", "select * from no_such_table"], 2),  # dbt itself failed
        (["show", "--no-such-flag"], 2),  # usage
    ):
        assert dbt(FORKED, args, env).returncode == dbt(REAL, args, env).returncode == expected


def _start_long_query(env: dict[str, str], server_dir: Path) -> tuple[subprocess.Popen, int]:
    before = set(forked_pids(server_dir))
    client = subprocess.Popen(
        [FORKED, "show", "--inline", LONG_QUERY],
        env=env,
        cwd=DBT_PROJECT_DIR,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert client.stdout is not None
    for line in client.stdout:  # until the query runs (dbt has parsed and connected)
        if '"name": "ConcurrencyLine"' in line or "Concurrency:" in line:
            break
    time.sleep(1)
    (child,) = set(forked_pids(server_dir)) - before
    assert alive(child)
    return client, child


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_an_interrupt_reaches_the_forked_run(env: dict[str, str], server_dir: Path) -> None:
    client, child = _start_long_query(env, server_dir)
    client.send_signal(signal.SIGINT)  # what dagster-dbt sends when a run is cancelled
    output, _ = client.communicate(timeout=60)
    assert client.returncode == 2, output[-2000:]  # dbt's own code for an interrupted run
    assert "KeyboardInterrupt" in output
    assert _wait_gone(child, 10)


def test_a_run_whose_client_is_killed_is_stopped(env: dict[str, str], server_dir: Path) -> None:
    client, child = _start_long_query(env, server_dir)
    client.kill()  # dagster-dbt's last resort after a cancel; the client cannot relay it
    client.communicate(timeout=10)
    assert _wait_gone(child, 10), "the forked dbt outlived its client"


def test_a_killed_server_is_replaced(env: dict[str, str], server_dir: Path) -> None:
    args = ["show", "--inline", "select 1 as one"]
    assert dbt(FORKED, args, env).returncode == 0
    (server,) = server_pids(server_dir)
    os.kill(server, signal.SIGKILL)  # leaves its socket file behind
    assert _wait_gone(server, 10)
    imported = server_log(server_dir).count("imported dbt")
    result = dbt(FORKED, args, env)
    assert result.returncode == 0, result.stdout[-2000:]
    assert server_log(server_dir).count("imported dbt") == imported + 1
    assert len(server_pids(server_dir)) == 1


def test_without_a_private_directory_it_runs_dbt_itself(
    env: dict[str, str], tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    result = dbt(
        FORKED,
        ["show", "--inline", "select 7 as seven"],
        env | {"EASYMLOPS_DBT_FORKSERVER_DIR": str(shared)},
    )
    assert result.returncode == 0, result.stdout[-2000:]
    assert "easymlops-dbt: running" in result.stderr and "must belong to uid" in result.stderr
    assert not list(shared.iterdir()), "a server was started in a shared directory"


def test_stop_servers_stops_the_server_and_not_other_directories(
    env: dict[str, str], server_dir: Path, tmp_path: Path
) -> None:
    assert dbt(FORKED, ["show", "--inline", "select 1 as one"], env).returncode == 0
    (server,) = server_pids(server_dir)
    other = tmp_path / "other"
    other.mkdir(mode=0o700)
    assert stop_servers(other) == []
    assert alive(server)
    assert stop_servers(server_dir) == [server]
    assert _wait_gone(server, 10)


def test_easymlops_down_stops_the_server(env: dict[str, str], server_dir: Path) -> None:
    assert dbt(FORKED, ["show", "--inline", "select 1 as one"], env).returncode == 0
    (server,) = server_pids(server_dir)
    home = {"EASYMLOPS_HOME": str(server_dir.parent / "down-home")}  # nothing else running
    down = subprocess.run(
        [str(BIN / "easymlops"), "down"], env=env | home, capture_output=True, text=True
    )
    assert down.returncode == 0, down.stderr
    assert "stopped: dbt fork server" in " ".join(down.stdout.split()), down.stdout
    assert _wait_gone(server, 10)


def test_a_stopped_server_lets_its_running_command_finish(
    env: dict[str, str], server_dir: Path
) -> None:
    client, child = _start_long_query(env, server_dir)
    (server,) = server_pids(server_dir)
    assert stop_servers(server_dir) == [server]
    time.sleep(1)
    assert alive(server) and alive(child), "the server must wait for its running command"
    assert not list(server_dir.glob("*.sock")), "a stopping server must not accept more"
    client.send_signal(signal.SIGINT)  # the command ends; its client still gets its code
    output, _ = client.communicate(timeout=60)
    assert client.returncode == 2, output[-2000:]
    assert "without dbt's exit code" not in output
    assert _wait_gone(server, 10)
