"""The Flink validation job in Kafka mode, for real: a standalone Flink cluster (jobmanager +
taskmanager from the PyFlink distribution, `easymlops up --with-flink`) runs
flink_jobs/validation_job.py against Apache Kafka, with exactly-once Kafka sinks, checkpoints
to a local directory and the session events to Redis.

- conservation: every raw record ends in exactly one output, read with read_committed;
- parity: the local runner (`easymlops validate`) on the same raw topic writes the same
  validated records, the same dead letters and the same session hashes;
- a kill -9 of the taskmanager mid-stream, a new taskmanager, a restart from the last
  checkpoint: nothing lost, nothing twice, also as kcat (an independent client) reads it;
- a stop with a savepoint, more events, a resume from that savepoint: the same.

Heavy (a JVM cluster, Python workers, about 40 s per job start on two cores): one cluster per
module, one job at a time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer
from typer.testing import CliRunner

from easymlops import flink_cluster
from easymlops import stack as stack_module
from easymlops.cli import app
from easymlops.features import session_key
from easymlops.kafka import ensure_topics
from easymlops.settings import Settings, get_settings
from easymlops.validate import run_validator
from tests.conftest import free_port, topic_env
from tests.test_validator_faults import (
    assert_conserved,
    assert_sessions_match,
    committed_messages,
    kcat_event_ids,
    produce,
    read_all,
)

pytestmark = pytest.mark.services

cli = CliRunner()
JOB_START_TIMEOUT = 240.0
CHECKPOINT_MS = 1000


def free_port_pair() -> int:
    """A free port whose successor is free too (the Flink processes' metrics ports)."""
    import socket

    for _ in range(100):
        port = free_port()
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no two free consecutive ports")


ROUTED = re.compile(
    rf'^{flink_cluster.ROUTED_EVENTS_METRIC}\{{[^}}]*destination="(\w+)"[^}}]*\}} ([0-9.eE+]+)$',
    re.MULTILINE,
)


def scrape(settings: Settings) -> str:
    """Every Flink process's Prometheus page, as Prometheus scrapes them."""
    import httpx

    pages = []
    for url in flink_cluster.metrics_urls(settings):
        try:
            pages.append(httpx.get(url, timeout=5).text)
        except httpx.TransportError:
            continue  # the jobmanager's or the taskmanager's reporter: one may hold either
    return "\n".join(pages)


def routed_by_flink(settings: Settings) -> Counter[str]:
    """What the job's metrics say it routed, per destination."""
    counts: Counter[str] = Counter()
    for destination, value in ROUTED.findall(scrape(settings)):
        counts[destination] += int(float(value))
    return counts


def series(page: str, metric: str, label: str = "") -> list[float]:
    """Values of `metric`'s series whose labels contain `label` (e.g. 'job_id="..."')."""
    pattern = rf"^{metric}\{{([^}}]*)\}} ([0-9.eE+-]+)$|^{metric} ([0-9.eE+-]+)$"
    return [
        float(value or bare)
        for labels, value, bare in re.findall(pattern, page, re.MULTILINE)
        if label in labels
    ]


TRACED = 20  # raw records with a traceparent of their own, to see it forwarded


def produce_traced(settings: Settings, seed: int) -> dict[str, bytes]:
    """TRACED valid events, each with a distinct traceparent header; event id -> traceparent."""
    from confluent_kafka import Producer

    from easymlops.generator import generate_payloads

    producer = Producer({"bootstrap.servers": settings.bootstrap_servers})
    sent: dict[str, bytes] = {}
    for i, payload in enumerate(generate_payloads(TRACED, days=1, seed=seed)):
        traceparent = f"00-{i + 1:032x}-{i + 1:016x}-01".encode()
        producer.produce(settings.topic_raw, payload, headers=[("traceparent", traceparent)])
        sent[json.loads(payload)["event_id"]] = traceparent
    assert producer.flush(30) == 0
    return sent


def traceparents(settings: Settings, topic: str) -> dict[str, bytes | None]:
    """Event id -> the traceparent header of each committed record of `topic` that has one."""
    found: dict[str, bytes | None] = {}
    for m in committed_messages(settings, topic):
        try:  # raw messages include the malformed ones the job dead-letters
            event_id = json.loads(m.value() or b"")["event_id"]
        except (ValueError, TypeError, KeyError):
            continue
        found[str(event_id)] = dict(m.headers() or []).get("traceparent")
    return found


@pytest.fixture(scope="module")
def cluster(
    apache_kafka: Settings, stack: Settings, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """A Flink cluster in a home of its own, pointed at Apache Kafka and the session's Redis."""
    settings = Settings(
        home=tmp_path_factory.mktemp("flink-home"),
        flink_rest_port=free_port(),
        flink_rpc_port=free_port(),
        flink_taskmanager_port=free_port(),
        flink_metrics_port=free_port_pair(),
        kafka_bootstrap=apache_kafka.bootstrap_servers,
        redis_url=stack.redis,
    )
    stack_module.up(settings, services=list(stack_module.FLINK))
    try:
        yield settings
    finally:
        for job in flink_cluster.jobs(settings):
            if job["state"] not in ("FINISHED", "CANCELED", "FAILED"):
                flink_cluster.cancel(settings, job["jid"])
        stack_module.down(settings)


@pytest.fixture
def topics(cluster: Settings) -> Settings:
    name = f"flink-{uuid.uuid4().hex[:8]}"
    settings = cluster.model_copy(
        update={f"topic_{t}": f"{name}.{t}" for t in ("raw", "validated", "invalid", "predictions")}
    )
    ensure_topics(settings)
    return settings


def job_env(settings: Settings) -> dict[str, str]:
    return {
        "EASYMLOPS_KAFKA_BOOTSTRAP": settings.bootstrap_servers,
        "EASYMLOPS_REDIS_URL": settings.redis,
        **topic_env(settings),
    }


def submit(settings: Settings, savepoint: str | None = None) -> str:
    """Start the job on this test's topics and wait until every task runs and one checkpoint
    completed; returns its id."""
    name = settings.topic_raw.rsplit(".", 1)[0]
    args = ["kafka", "--checkpoint-interval-ms", str(CHECKPOINT_MS)]
    args += ["--group-id", f"{name}-flink", "--transactional-id-prefix", name]
    data_dir = stack_module.flink_data_dir(settings)
    job_id = flink_cluster.submit(
        settings, data_dir, args, savepoint=savepoint, env=job_env(settings)
    )
    flink_cluster.wait_for(settings, job_id, "RUNNING", JOB_START_TIMEOUT, checkpoints=1)
    return job_id


def output_count(settings: Settings) -> int:
    outputs = (settings.topic_validated, settings.topic_invalid)
    # while the job runs, a transaction is open until its next checkpoint: count what is
    # committed now
    return sum(len(read_all(settings, topic, wait_for_open=False)) for topic in outputs)


def some_output(settings: Settings) -> bool:
    """Has the job committed any validated record yet? (one quick read_committed poll)"""
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"probe-{uuid.uuid4().hex[:6]}",
            "isolation.level": "read_committed",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    try:
        reader.subscribe([settings.topic_validated])
        return any(m.error() is None for m in reader.consume(1, timeout=2))
    finally:
        reader.close()


def wait_for_output(settings: Settings, expected: int, timeout: float = 240.0) -> None:
    """Until read_committed readers see `expected` records in the two outputs (more is a
    failure the conservation check then names)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while time.monotonic() < deadline:
        seen = output_count(settings)
        if seen >= expected:
            return
        time.sleep(1)
    raise AssertionError(f"the Flink job wrote {seen} of {expected} records in {timeout:.0f} s")


def test_conservation_and_parity_with_the_local_runner(topics: Settings) -> None:
    produced = produce(topics, 5_000, seed=7301)
    traced = produce_traced(topics, seed=7311)
    produced += len(traced)
    job_id = submit(topics)
    try:
        wait_for_output(topics, produced)
        # The job's own counters reach Prometheus as each Python bundle finishes.
        deadline = time.monotonic() + 30
        while sum((routed := routed_by_flink(topics)).values()) < produced:
            assert time.monotonic() < deadline, f"Flink's metrics count {dict(routed)}"
            time.sleep(1)
        # A healthy run: the restart alert's series is there and at zero.
        restarts = series(scrape(topics), flink_cluster.RESTARTS_METRIC, f'job_id="{job_id}"')
        assert restarts == [0.0], restarts
    finally:
        flink_cluster.cancel(topics, job_id)
    events = assert_conserved(topics, produced)
    assert_sessions_match(topics, events)

    # The local runner on the same raw topic, into outputs (and a Redis database) of its own.
    runner = topics.model_copy(
        update={
            "topic_validated": f"{topics.topic_raw}.runner-validated",
            "topic_invalid": f"{topics.topic_raw}.runner-invalid",
            "redis_url": topics.redis.rsplit("/", 1)[0] + "/1",
        }
    )
    ensure_topics(runner)
    stats = run_validator(runner, until_idle=True, idle_seconds=3)
    assert stats.valid + stats.invalid == produced

    def records(settings: Settings, topic: str) -> Counter[bytes]:
        return Counter(value for _, _, value in read_all(settings, topic))

    def dead_letters(settings: Settings) -> Counter[str]:
        # received_at is the wall clock of the validator that saw the message
        letters = (json.loads(v) for _, _, v in read_all(settings, settings.topic_invalid))
        return Counter(
            json.dumps({k: v for k, v in letter.items() if k != "received_at"}, sort_keys=True)
            for letter in letters
        )

    flink_valid = records(topics, topics.topic_validated)
    assert flink_valid == records(runner, runner.topic_validated)
    # Each validated record carries its raw message's traceparent, so landing continues the
    # producer's trace; the producer's own chunks carry theirs (a span's or, untraced, zeros).
    raw_traceparents = traceparents(topics, topics.topic_raw)
    flink_traceparents = traceparents(topics, topics.topic_validated)
    assert {e: flink_traceparents[e] for e in traced} == traced
    assert flink_traceparents == {e: raw_traceparents[e] for e in flink_traceparents}
    assert routed == {"valid": stats.valid, "invalid": stats.invalid}
    flink_invalid = dead_letters(topics)
    assert sum(flink_invalid.values()) > 0, "the input must hold invalid events"
    assert flink_invalid == dead_letters(runner)
    flink_redis = redis.Redis.from_url(topics.redis, decode_responses=True)
    runner_redis = redis.Redis.from_url(runner.redis, decode_responses=True)
    sessions = {e.user_session for e in events}
    for session in sessions:
        key = session_key(session)
        assert flink_redis.hgetall(key) == runner_redis.hgetall(key), session


def test_taskmanager_killed_mid_stream_restarts_from_the_last_checkpoint(
    topics: Settings,
) -> None:
    # Events keep arriving while the taskmanager dies and its successor catches up.
    batches: list[int] = [produce(topics, 2_000, seed=7302)]

    def keep_producing() -> None:
        for i in range(30):
            batches.append(produce(topics, 1_000, seed=73020 + i))
            time.sleep(0.5)

    job_id = submit(topics)
    producer = threading.Thread(target=keep_producing)
    producer.start()
    try:
        deadline = time.monotonic() + 120
        while not some_output(topics) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert producer.is_alive(), "the kill must land mid-stream"
        (manager,) = stack_module.status(topics, services=["flink-taskmanager"])
        assert manager.pid is not None, manager
        os.killpg(manager.pid, signal.SIGKILL)  # the JVM and its Python workers
        while stack_module.status(topics, services=["flink-taskmanager"])[0].pid is not None:
            time.sleep(0.1)  # SIGKILL is delivered, not yet done: the JVM has many threads
        # On a port of its own: the dead one's port lies in the ephemeral range, where the
        # test's Kafka clients may hold it by now.
        successor = topics.model_copy(update={"flink_taskmanager_port": free_port()})
        stack_module.up(successor, services=["flink-taskmanager"])
        producer.join()
        wait_for_output(topics, sum(batches))
        restored = flink_cluster.restored_from(topics, job_id)
        assert restored is not None and not restored["is_savepoint"], restored
        # What the FlinkJobRestarting alert watches (infra/prometheus/alerts.yml) saw it.
        page = scrape(topics)
        restarts = series(page, flink_cluster.RESTARTS_METRIC, f'job_id="{job_id}"')
        assert restarts and restarts[0] >= 1, (restarts, page[:2000])
        assert series(page, flink_cluster.RUNNING_JOBS_METRIC) == [1.0]
    finally:
        producer.join()
        flink_cluster.cancel(topics, job_id)
    events = assert_conserved(topics, sum(batches))
    assert_sessions_match(topics, events)
    ids = kcat_event_ids(topics, topics.topic_validated)
    assert len(ids) == len(set(ids)) == len(events)


def cli_env(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point `easymlops` (get_settings) at this cluster, broker, Redis and topics."""
    env = {
        **job_env(settings),
        "EASYMLOPS_HOME": str(settings.home_dir),
        "EASYMLOPS_FLINK_REST_PORT": str(settings.flink_rest_port),
        "EASYMLOPS_FLINK_RPC_PORT": str(settings.flink_rpc_port),
        "EASYMLOPS_FLINK_TASKMANAGER_PORT": str(settings.flink_taskmanager_port),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()


def test_stop_with_savepoint_then_resume_through_the_cli(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`easymlops flink submit`, `easymlops flink stop` (savepoint), more events, `easymlops
    flink submit --from-savepoint`: the resumed job restores that savepoint and the two runs
    together write every event once."""
    cli_env(topics, monkeypatch)
    try:
        first = produce(topics, 3_000, seed=7303)
        started = cli.invoke(app, ["flink", "submit", "--checkpoint-interval-ms", "1000"])
        assert started.exit_code == 0, started.output
        wait_for_output(topics, first)
        stopped = cli.invoke(app, ["flink", "stop"])
        assert stopped.exit_code == 0, stopped.output
        (job_id, savepoint) = re.findall(r"job (\w+) stopped; savepoint: (\S+)", stopped.output)[0]
        assert flink_cluster.job_state(topics, job_id) == "FINISHED"
        second = produce(topics, 3_000, seed=7304)
        resumed = cli.invoke(
            app,
            ["flink", "submit", "--checkpoint-interval-ms", "1000", "--from-savepoint", savepoint],
        )
        assert resumed.exit_code == 0, resumed.output
        (resumed_id,) = re.findall(r"job (\w+) running", resumed.output)
        try:
            restored = flink_cluster.restored_from(topics, resumed_id)
            assert restored is not None and restored["is_savepoint"], restored
            assert restored["external_path"] == savepoint
            wait_for_output(topics, first + second)
        finally:
            flink_cluster.cancel(topics, resumed_id)
    finally:
        get_settings.cache_clear()
    events = assert_conserved(topics, first + second)
    assert_sessions_match(topics, events)


def test_submit_without_a_cluster_says_how_to_start_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EASYMLOPS_HOME", str(tmp_path))
    monkeypatch.setenv("EASYMLOPS_FLINK_REST_PORT", str(free_port()))
    get_settings.cache_clear()
    try:
        submitted = cli.invoke(app, ["flink", "submit"])
        stopped = cli.invoke(app, ["flink", "stop"])
    finally:
        get_settings.cache_clear()
    assert submitted.exit_code == 1
    assert "easymlops up --with-flink" in submitted.output
    assert stopped.exit_code == 1
    assert "Flink REST API at http://127.0.0.1:" in stopped.output
