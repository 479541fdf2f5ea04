"""The local validator under faults, on the real broker and Redis: `kill -9` mid-stream, the broker
paused (SIGSTOP) for 10 s, Redis restarted, a commit failing after its batch reached the broker.
After each: valid + invalid = raw, no record twice (also on a broker that shows aborted
transactions), every dead letter points at a distinct raw offset, and the session hashes in
Redis hold each of the session's validated events exactly once (despite replays)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from easymlops import stack as stack_module
from easymlops.features import session_key
from easymlops.generator import generate_payloads
from easymlops.kafka import committed_offsets, end_offsets, ensure_topics, partitions, producer
from easymlops.produce import produce_payloads
from easymlops.schema import Event, validate_bytes
from easymlops.session_features import session_fields
from easymlops.settings import Settings
from easymlops.validate import (
    GC_THRESHOLD,
    GROUP_ID,
    SOURCE_HEADER,
    ValidationStats,
    Validator,
    _fewer_gc_passes,
    run_validator,
)
from tests.conftest import Broker, topic_env, watermarks

pytestmark = pytest.mark.services


@pytest.fixture
def topics(broker: Broker) -> Iterator[Settings]:
    """Settings with topics of this test's own, so counts are exact (no other test's events),
    on each broker in turn."""
    name = f"faults-{uuid.uuid4().hex[:8]}"
    settings = broker.settings.model_copy(
        update={
            "topic_raw": f"{name}.raw",
            "topic_validated": f"{name}.validated",
            "topic_invalid": f"{name}.invalid",
            "topic_predictions": f"{name}.predictions",
        }
    )
    ensure_topics(settings)
    yield settings


def committed_messages(
    settings: Settings, topic: str, *, wait_for_open: bool = True, timeout: float = 120
) -> list[Message]:
    """Every committed record of `topic`, read by an independent client to the end of each
    partition. A read_committed reader ends at the last stable offset, so an end short of the
    high watermark means a transaction is still open there (e.g. its markers not yet written
    after a broker pause). With `wait_for_open` the reader waits until every partition's end
    reaches the high watermark it had at the start, and names the partitions if one never
    does, instead of reading a part of the topic and reporting the rest as lost. Without it
    (polling a running job) it returns what is committed now."""
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"reader-{uuid.uuid4().hex[:6]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        parts = [TopicPartition(topic, p, 0) for p in partitions(settings, topic)]
        # The end each partition must reach; without wait_for_open any end of partition will do.
        highs = (
            watermarks(settings, topic, (tp.partition for tp in parts))
            if wait_for_open
            else dict.fromkeys((tp.partition for tp in parts), 0)
        )
        reader.assign(parts)
        reached: dict[int, int] = {}  # partition -> offset of its latest end-of-partition
        messages: list[Message] = []
        deadline = time.monotonic() + timeout
        while any(reached.get(p, -1) < high for p, high in highs.items()):
            if time.monotonic() > deadline:
                behind = {
                    p: f"stable end {reached.get(p)}, high watermark {high}"
                    for p, high in highs.items()
                    if reached.get(p, -1) < high
                }
                raise AssertionError(
                    f"{topic}: a read_committed reader did not reach the high watermark in "
                    f"{timeout:.0f} s (a transaction still open?): {behind}"
                )
            for message in reader.consume(10_000, timeout=0.5):
                error = message.error()
                if error is None:
                    messages.append(message)
                elif error.code() == KafkaError._PARTITION_EOF:
                    reached[message.partition() or 0] = message.offset() or 0
                else:
                    raise KafkaException(error)
        return messages
    finally:
        reader.close()


def read_all(
    settings: Settings, topic: str, *, wait_for_open: bool = True
) -> list[tuple[int, int, bytes]]:
    """(partition, offset, value) of every committed record, read by an independent client."""
    return [
        (m.partition() or 0, m.offset() or 0, m.value() or b"")
        for m in committed_messages(settings, topic, wait_for_open=wait_for_open)
    ]


def committed_total(settings: Settings) -> int:
    """How many raw records the validator group has committed so far."""
    # read_uncommitted: a read_committed client asks for *stable* offsets, and Apache Kafka
    # answers "unstable" (the client retries until it times out) while a transaction holding
    # offsets of the group is open, e.g. a crashed runner's. The committed offsets are what
    # this counts either way; pending ones are never returned.
    probe = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": GROUP_ID,
            "isolation.level": "read_uncommitted",
        }
    )
    try:
        parts = [
            TopicPartition(settings.topic_raw, p) for p in partitions(settings, settings.topic_raw)
        ]
        # retried: a broker just started answers NOT_COORDINATOR for a few seconds
        return sum(max(tp.offset, 0) for tp in committed_offsets(probe, parts, timeout=30))
    finally:
        probe.close()


def wait_for_progress(settings: Settings, at_least: int, timeout: float = 60) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = committed_total(settings)
        if done >= at_least:
            return done
        time.sleep(0.05)
    raise AssertionError(f"validator committed fewer than {at_least} records in {timeout} s")


def aborted_records_are_visible(settings: Settings) -> bool:
    """Does this broker show an aborted transaction's records to read_committed consumers?

    Kafka never does. Tansu 0.x (the embedded broker) does: it hides an open transaction but
    not an aborted one. The validator copes (it finds such records before producing a batch
    again and skips them); this probe tells the tests whether that path was exercised."""
    topic = f"{settings.topic_raw}.abort-probe"
    ensure_topics(settings.model_copy(update={"topic_raw": topic}))
    client = producer(settings, **{"transactional.id": f"abort-probe-{uuid.uuid4().hex}"})
    client.init_transactions(30)
    client.begin_transaction()
    client.produce(topic, b"aborted", partition=0)
    client.flush(10)
    client.abort_transaction(30)
    return len(read_all(settings, topic)) > 0


def test_read_committed_hides_aborted_records_on_kafka_only(
    topics: Settings, broker: Broker
) -> None:
    """Kafka hides an aborted transaction from read_committed readers; Tansu shows it. Only on
    Tansu, then, does the validator's scan for leaked records find anything (the retry and
    crash tests below assert leaked_skipped per broker)."""
    assert aborted_records_are_visible(topics) == (broker.name == "tansu")


def test_the_reader_names_a_transaction_left_open_instead_of_counting_it_lost(
    topics: Settings,
) -> None:
    """The conservation checks read with committed_messages: a record held back by an open
    transaction must fail the read by name, not go missing from the count."""
    topic = topics.topic_validated
    client = producer(topics, **{"transactional.id": f"open-txn-{uuid.uuid4().hex}"})
    client.init_transactions(30)
    client.begin_transaction()
    client.produce(topic, b"held back", partition=0)
    assert client.flush(10) == 0
    try:
        with pytest.raises(AssertionError, match=r"did not reach the high watermark.*\b0: "):
            committed_messages(topics, topic, timeout=5)
        assert committed_messages(topics, topic, wait_for_open=False) == []
        client.commit_transaction(30)
        assert [m.value() for m in committed_messages(topics, topic)] == [b"held back"]
    finally:
        with contextlib.suppress(KafkaException):
            client.abort_transaction(5)


def missing_ranges(raw_ends: dict[int, int], seen: set[tuple[int, int]]) -> dict[int, str]:
    """Per raw partition, the offsets with no output record, as compact ranges."""
    out: dict[int, str] = {}
    for partition, end in sorted(raw_ends.items()):
        gaps: list[str] = []
        start: int | None = None
        for offset in range(end + 1):
            absent = offset < end and (partition, offset) not in seen
            if absent and start is None:
                start = offset
            elif not absent and start is not None:
                gaps.append(f"{start}-{offset - 1}" if offset - 1 > start else f"{start}")
                start = None
        if gaps:
            out[partition] = ", ".join(gaps)
    return out


def assert_conserved(
    settings: Settings, produced: int, stats: ValidationStats | None = None
) -> list[Event]:
    """Nothing lost: every raw record is in the output, valid or dead-lettered. Nothing
    duplicated, on any broker. Returns the distinct validated events. A loss is reported
    with the raw offsets that have no output record, and the validator's `stats` if given
    (retries, records skipped as leaked)."""
    raw_ends = end_offsets(settings, settings.topic_raw)
    raw_total = sum(raw_ends.values())
    assert raw_total == produced
    valid = committed_messages(settings, settings.topic_validated)
    invalid = read_all(settings, settings.topic_invalid)
    by_id = {e.event_id: e for e in (validate_bytes(m.value() or b"") for m in valid)}
    sources = {
        (json.loads(v)["source_partition"], json.loads(v)["source_offset"]) for _, _, v in invalid
    }
    if len(by_id) + len(sources) != raw_total:
        seen = set(sources)
        for message in valid:
            source = dict(message.headers() or ()).get(SOURCE_HEADER)
            if isinstance(source, bytes):  # the local validator's records carry it
                partition, offset = source.split(b":")
                seen.add((int(partition), int(offset)))
        where = (
            f"raw offsets with no output record, by partition: {missing_ranges(raw_ends, seen)}"
            if len(seen) == len(by_id) + len(sources)
            else "the output records carry no source offsets"  # Flink's do not
        )
        raise AssertionError(
            f"{raw_total - len(by_id) - len(sources)} raw records lost "
            f"(valid {len(by_id)} + dead letters {len(sources)} of {raw_total}, in "
            f"{len(valid) + len(invalid)} output records); {where}"
            + (f"; validator stats: {stats.to_dict()}" if stats else "")
        )
    copies = len(valid) + len(invalid) - raw_total
    assert copies == 0, f"{copies} records written twice"
    return list(by_id.values())


def assert_sessions_match(settings: Settings, events: list[Event]) -> None:
    """Redis holds exactly each session's validated events, one field each."""
    by_session: dict[str, list[Event]] = defaultdict(list)
    for event in events:
        by_session[event.user_session].append(event)
    client = redis.Redis.from_url(settings.redis, decode_responses=True)
    for session, session_events in by_session.items():
        assert client.hgetall(session_key(session)) == session_fields(session_events), session


def produce(settings: Settings, n: int, seed: int) -> int:
    result = produce_payloads(settings, generate_payloads(n, days=3, seed=seed, invalid_ratio=0.02))
    assert result.failed == 0
    return result.delivered


def validator_env(settings: Settings) -> dict[str, str]:
    return {**os.environ, **topic_env(settings)}


def kcat_event_ids(settings: Settings, topic: str) -> list[str]:
    """Event ids of `topic` as Debian's kcat reads them (read_committed): a client that is not
    ours, built on an older librdkafka (2.0.2, which fails against Tansu at its first request)."""
    done = subprocess.run(
        [
            *("kcat", "-C", "-b", settings.bootstrap_servers, "-t", topic),
            *("-X", "isolation.level=read_committed", "-o", "beginning", "-e", "-q"),
            *("-f", "%s\\n"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line)["event_id"] for line in done.stdout.splitlines() if line]


def test_kill_9_mid_stream_loses_and_duplicates_nothing(topics: Settings, broker: Broker) -> None:
    produced = produce(topics, 40_000, seed=9101)
    cmd = [sys.executable, "-m", "easymlops.cli", "validate", "--batch-size", "500"]
    runner = subprocess.Popen(
        cmd, env=validator_env(topics), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        done = wait_for_progress(topics, 2_000)
        runner.send_signal(signal.SIGKILL)
        runner.wait(10)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert done < produced, "the runner finished before it could be killed"
    # The restart resumes from the committed offsets and finishes the topic.
    finished = subprocess.run(
        cmd, env=validator_env(topics), capture_output=True, text=True, timeout=300
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    stats = json.loads(finished.stdout[finished.stdout.index("{") :])
    assert 0 < stats["consumed"] < produced  # it did not start over
    # The killed runner's open batch is aborted by the restart, and not produced twice.
    events = assert_conserved(topics, produced)
    assert_sessions_match(topics, events)
    if broker.name == "kafka":  # and so an independent client sees it
        ids = kcat_event_ids(topics, topics.topic_validated)
        assert len(ids) == len(set(ids)) == len(events)


def test_follow_mode_stops_cleanly_on_sigterm_and_a_restart_resumes(topics: Settings) -> None:
    """Continuous mode keeps consuming what arrives after it started; SIGTERM finishes and
    commits the batch in flight and exits 0 with its counts; the restart takes the rest."""
    first = produce(topics, 4_000, seed=9301)
    cmd = [sys.executable, "-m", "easymlops.cli", "validate", "--follow", "--batch-size", "500"]
    runner = subprocess.Popen(
        cmd,
        env=validator_env(topics),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_for_progress(topics, first)  # drained, and still running: it follows
        time.sleep(2)
        assert runner.poll() is None, "--follow exited on an idle topic"
        second = produce(topics, 30_000, seed=9302)
        wait_for_progress(topics, first + 1_000)
        runner.send_signal(signal.SIGTERM)
        stdout, stderr = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
    assert runner.returncode == 0, stderr[-2000:]
    stopped = json.loads(stdout[stdout.index("{") :])
    # Everything it reports was committed: the restart starts exactly there.
    assert committed_total(topics) == stopped["consumed"]
    assert first < stopped["consumed"] < first + second, "SIGTERM came too late to test"

    finished = subprocess.run(
        [sys.executable, "-m", "easymlops.cli", "validate", "--until-idle"],
        env=validator_env(topics),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert finished.returncode == 0, finished.stderr[-2000:]
    rest = json.loads(finished.stdout[finished.stdout.index("{") :])
    assert stopped["consumed"] + rest["consumed"] == first + second
    assert_sessions_match(topics, assert_conserved(topics, first + second))


def run_in_thread(
    settings: Settings, idle_seconds: float = 3
) -> tuple[threading.Thread, dict[str, ValidationStats]]:
    result: dict[str, ValidationStats] = {}

    def work() -> None:
        result["stats"] = run_validator(settings, batch_size=500, idle_seconds=idle_seconds)

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    return thread, result


def test_broker_paused_for_10_seconds_then_resumed(topics: Settings, broker: Broker) -> None:
    produced = produce(topics, 30_000, seed=9102)
    pid = broker.pid()
    thread, result = run_in_thread(topics)
    wait_for_progress(topics, 1_000)
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(10)
    finally:
        os.kill(pid, signal.SIGCONT)
    thread.join(240)
    assert not thread.is_alive(), "the validator did not finish after the broker came back"
    assert result["stats"].consumed == produced
    assert_conserved(topics, produced, result["stats"])


def test_redis_restart_is_waited_out(topics: Settings) -> None:
    produced = produce(topics, 10_000, seed=9103)
    # A long idle window: the validator must still be running when the second half arrives.
    thread, result = run_in_thread(topics, idle_seconds=20)
    wait_for_progress(topics, 1_000)
    stack_module.down(topics, services=["redis"])
    try:
        # Produced while Redis is down: the validator has to wait for it to come back.
        produced += produce(topics, 10_000, seed=9104)
        time.sleep(3)
    finally:
        stack_module.up(topics, services=["redis"])
    thread.join(240)
    assert not thread.is_alive(), "the validator did not finish after Redis came back"
    stats = result["stats"]
    assert stats.consumed == produced
    assert stats.retries > 0, "Redis was down for 3 s: the validator should have retried"
    events = assert_conserved(topics, produced)
    assert_sessions_match(topics, events)


class CommitFailsOnce:
    """The validator's producer, whose first commit fails after the batch reached the broker:
    an aborted transaction whose records are all on the broker, with no timing luck."""

    def __init__(self, inner: Producer, error: BaseException) -> None:
        self.inner, self.error, self.failed = inner, error, False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def commit_transaction(self, *args: Any) -> None:
        if not self.failed:
            self.failed = True
            assert self.inner.flush(30) == 0  # every record of the batch delivered
            raise self.error
        self.inner.commit_transaction(*args)


def test_a_batch_retried_after_its_commit_failed_is_not_written_twice(topics: Settings) -> None:
    produced = produce(topics, 2_000, seed=9106)
    validator = Validator(topics, batch_size=500)
    failing = KafkaError(KafkaError._TIMED_OUT, "injected: commit timed out", retriable=True)
    first = CommitFailsOnce(validator.sink, KafkaException(failing))
    validator.sink = first  # type: ignore[assignment]
    stats = validator.run(idle_seconds=1)
    assert stats.retries == 1
    # The retry ran under a new producer, i.e. a new producer epoch: in the failed attempt's
    # epoch the broker may take the retry's records for duplicates of aborted ones (_recover).
    assert validator.sink is not first
    assert stats.consumed == produced
    assert stats.valid + stats.invalid == produced
    assert_sessions_match(topics, assert_conserved(topics, produced))
    # On a broker that shows the aborted attempt, all of it was found and skipped.
    assert stats.leaked_skipped == (500 if aborted_records_are_visible(topics) else 0)


def test_a_restart_does_not_rewrite_the_batch_a_crashed_runner_left_open(
    topics: Settings,
) -> None:
    """The runner dies between producing a batch and committing it (as under `kill -9`); the
    restart's init_transactions aborts that transaction and must not write the batch twice."""
    produced = produce(topics, 2_000, seed=9107)
    crashed = Validator(topics, batch_size=500)
    crashed.sink = CommitFailsOnce(crashed.sink, SystemExit("crashed"))  # type: ignore[assignment]
    with pytest.raises(SystemExit):
        crashed.run(idle_seconds=1)
    assert committed_total(topics) == 0

    stats = Validator(topics, batch_size=500).run(idle_seconds=1)
    assert stats.consumed == produced  # it started over from the committed offsets
    assert_sessions_match(topics, assert_conserved(topics, produced))
    assert stats.leaked_skipped == (500 if aborted_records_are_visible(topics) else 0)


def test_metrics_through_opentelemetry_and_a_periodic_log_line(topics: Settings) -> None:
    produced = produce(topics, 5_000, seed=9105)
    env = validator_env(topics) | {
        "EASYMLOPS_OTEL_CONSOLE": "1",
        "OTEL_METRIC_EXPORT_INTERVAL": "500",
        "COLUMNS": "200",
    }
    cmd = [sys.executable, "-m", "easymlops.cli", "validate", "--batch-size", "500"]
    result = subprocess.run(
        [*cmd, "--log-interval", "0.2", "--idle-seconds", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "validator: consumed" in result.stderr  # the periodic log line
    # The console exporter prints each export as JSON; the last one holds the final totals.
    exports = [
        json.loads(chunk) for chunk in _json_objects(result.stdout) if "resource_metrics" in chunk
    ]
    assert exports, result.stdout[-2000:]
    points: dict[str, list[dict]] = defaultdict(list)
    for scope in exports[-1]["resource_metrics"][0]["scope_metrics"]:
        for metric in scope["metrics"]:
            points[metric["name"]].extend(metric["data"]["data_points"])
    routed = {p["attributes"]["destination"]: 0 for p in points["easymlops.validator.events"]}
    for p in points["easymlops.validator.events"]:
        routed[p["attributes"]["destination"]] += p["value"]
    assert routed["valid"] + routed["invalid"] == produced
    assert routed["invalid"] == 100  # 2 % of 5,000
    # Gauges report while the validator runs (the final export, after it stopped, has none).
    gauges: dict[str, list[float]] = defaultdict(list)
    for export in exports:
        for scope in export["resource_metrics"][0]["scope_metrics"]:
            for metric in scope["metrics"]:
                if metric["name"].endswith(("invalid_ratio", "throughput")):
                    gauges[metric["name"]] += [p["value"] for p in metric["data"]["data_points"]]
    assert gauges["easymlops.validator.throughput"], "no throughput reported while running"
    assert all(0 <= r < 0.1 for r in gauges["easymlops.validator.invalid_ratio"])
    assert gauges["easymlops.validator.invalid_ratio"]


def _json_objects(text: str) -> list[str]:
    """Top-level JSON objects printed one after another (pretty-printed, so split on braces)."""
    objects, depth, start = [], 0, 0
    for i, char in enumerate(text):
        if char == "{":
            if depth == 0:
                start = i
            depth += 1
        elif char == "}" and depth:
            depth -= 1
            if depth == 0:
                objects.append(text[start : i + 1])
    return objects


def test_gc_tuning_holds_while_any_validator_runs_and_is_undone_after() -> None:
    before = (gc.get_threshold(), gc.get_freeze_count())
    with _fewer_gc_passes():
        with _fewer_gc_passes():  # a second validator in the same process
            assert gc.get_threshold()[0] == GC_THRESHOLD
        assert gc.get_threshold()[0] == GC_THRESHOLD  # the first one still runs
        assert gc.get_freeze_count() > 0
    assert (gc.get_threshold(), gc.get_freeze_count()) == before
