"""The session's embedded stack really works: each service is used the way the platform uses
it (produce/consume, hashes, tracking runs, Ray tasks), against real processes on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections import defaultdict

import httpx
import pytest
import redis
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from easymlops import kafka as kafka_helpers
from easymlops import stack as stack_module
from easymlops.services.ray import temp_dir as ray_temp_dir
from easymlops.settings import Settings

pytestmark = pytest.mark.services


def test_status_reports_the_session_stack(stack: Settings) -> None:
    statuses = {status.name: status for status in stack_module.status(stack)}
    assert list(statuses) == list(stack_module.SERVICES)
    for name in stack_module.MANAGED:
        assert statuses[name].state == "running", statuses[name]
        assert statuses[name].pid is not None
    assert statuses["kafka"].url == f"kafka://{stack.host}:{stack.kafka_port}"
    assert statuses["mlflow"].url == stack.mlflow_uri
    assert statuses["ray"].url == stack.ray
    dashboard = statuses["ray"].links["dashboard"]
    assert httpx.get(f"{dashboard}/api/version", timeout=5).json()["ray_version"]
    assert statuses["serve"].url == stack.serve_url


def test_platform_topics_exist(stack: Settings) -> None:
    topics = AdminClient({"bootstrap.servers": stack.bootstrap_servers}).list_topics(timeout=10)
    for topic in stack.topics:
        assert topic in topics.topics
        assert len(topics.topics[topic].partitions) == stack.topic_partitions


def test_broker_round_trip_is_exact(stack: Settings) -> None:
    """Every produced record comes back exactly once, in order per partition."""
    topic = f"test.roundtrip.{uuid.uuid4().hex[:8]}"
    partitions, count = 3, 1500
    admin = AdminClient({"bootstrap.servers": stack.bootstrap_servers})
    for future in admin.create_topics([NewTopic(topic, partitions, 1)]).values():
        future.result(timeout=15)

    producer = kafka_helpers.producer(stack)
    sent: dict[int, list[bytes]] = defaultdict(list)
    for i in range(count):
        value = f"event-{i}".encode()
        producer.produce(topic, value=value, key=f"k{i}".encode(), partition=i % partitions)
        sent[i % partitions].append(value)
    assert producer.flush(30) == 0

    # Direct assignment from offset 0: a consumer group's first join costs seconds on Tansu.
    consumer = Consumer(
        {
            "bootstrap.servers": stack.bootstrap_servers,
            "group.id": f"test-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    received: dict[int, list[bytes]] = defaultdict(list)
    offsets: dict[int, list[int]] = defaultdict(list)
    try:
        consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
        deadline = time.monotonic() + 30
        while sum(map(len, received.values())) < count and time.monotonic() < deadline:
            for message in consumer.consume(500, timeout=1.0):
                assert message.error() is None, message.error()
                part, payload, offset = message.partition(), message.value(), message.offset()
                assert part is not None and payload is not None and offset is not None
                received[part].append(payload)
                offsets[part].append(offset)
        assert consumer.consume(100, timeout=1.0) == []  # nothing beyond what we sent
    finally:
        consumer.close()

    assert received == sent
    for partition, values in sent.items():
        assert offsets[partition] == list(range(len(values)))
    assert kafka_helpers.end_offsets(stack, topic) == {p: len(sent[p]) for p in sent}


def test_redis_round_trip(stack: Settings) -> None:
    client = redis.Redis.from_url(stack.redis, decode_responses=True)
    try:
        key = f"test:{uuid.uuid4().hex[:8]}"
        assert client.set(f"{key}:plain", "value")
        assert client.get(f"{key}:plain") == "value"
        client.hset(f"{key}:hash", mapping={"views": 3, "price": 9.5, "brand": "acme"})
        assert client.hgetall(f"{key}:hash") == {"views": "3", "price": "9.5", "brand": "acme"}
        assert client.hincrby(f"{key}:hash", "views", 2) == 5
        assert client.expire(f"{key}:hash", 60)
        assert 0 < client.ttl(f"{key}:hash") <= 60
        # Persistence is on (append-only file), as `up` promises.
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        client.close()


def test_mlflow_tracking_round_trip(stack: Settings) -> None:
    """A run with params, a metric history and an artifact is stored and read back through
    the tracking server (artifacts go through its proxy, not the local disk)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    experiment_id = client.create_experiment(f"test-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment_id).info.run_id
    client.log_param(run_id, "max_depth", "6")
    client.log_metric(run_id, "auc", 0.71, step=0)
    client.log_metric(run_id, "auc", 0.78, step=1)
    client.log_text(run_id, "purchase propensity", "notes/model.txt")
    client.set_terminated(run_id)

    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"max_depth": "6"}
    assert run.data.metrics == {"auc": 0.78}
    history = client.get_metric_history(run_id, "auc")
    assert [(m.step, m.value) for m in history] == [(0, 0.71), (1, 0.78)]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert [a.path for a in client.list_artifacts(run_id, "notes")] == ["notes/model.txt"]
    found = client.search_runs([experiment_id])
    assert [r.info.run_id for r in found] == [run_id]


def test_ray_head_accepts_a_driver(stack: Settings) -> None:
    """A driver connects with `ray.init(address=settings.ray)` and runs tasks. In a subprocess,
    so this test process does not become a Ray driver for the rest of the session."""
    code = (
        "import sys, ray\n"
        "ray.init(address=sys.argv[1], logging_level='ERROR')\n"
        "square = ray.remote(lambda x: x * x)\n"
        "print(sum(ray.get([square.remote(i) for i in range(10)])))\n"
        "print(ray.cluster_resources().get('CPU'))\n"
    )
    try:
        result = subprocess.run(
            [sys.executable, "-c", code, stack.ray],
            capture_output=True,
            text=True,
            timeout=240,
            # Under `uv run pytest` Ray would start its workers through `uv run` as well; without
            # RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 the driver swaps 127.0.0.1 for the LAN address
            # and never reaches the loopback-only head (seen in CI).
            env={
                **os.environ,
                "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            },
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        logs = ray_temp_dir(stack) / "session_latest" / "logs"
        pytest.fail(f"driver timed out; Ray logs in {logs}\n{stderr[-3000:]}")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[0] == "285"
    assert float(lines[1]) >= 2
