"""Landing Kafka topics into bronze Delta tables: offsets committed never pass what was read,
a topic that went back behind its table is refused, dead-letter envelopes keep every field.
Broker tests use topics and lakes of their own (the session stack is shared)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, fields
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import pytest
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from test_stream_to_lake import read_topic

from easymlops import lake
from easymlops.generator import generate_payloads
from easymlops.kafka import admin, end_offsets, ensure_topics, producer, topic_id
from easymlops.schema import MAX_MESSAGE_BYTES, DeadLetter, ValidationError, validate_bytes
from easymlops.settings import Settings
from tests.conftest import Broker, wait_for_commit_markers

services = pytest.mark.services


def own_topic(stack: Settings, tmp_path: Path, kind: str) -> Settings:
    """Settings whose `kind` topic ("validated" or "invalid") is a new, empty topic and whose
    lake is under tmp_path."""
    name = f"test.lake.{kind}.{uuid.uuid4().hex[:8]}"
    settings = stack.model_copy(update={f"topic_{kind}": name, "lake_uri": str(tmp_path / "lake")})
    assert name in ensure_topics(settings)
    return settings


def produce_in_transaction(settings: Settings, topic: str, values: list[bytes]) -> None:
    """As the validator writes: one transaction, so each partition ends with a commit marker."""
    client = producer(settings, **{"transactional.id": f"test-lake-{uuid.uuid4().hex}"})
    client.init_transactions(30)
    client.begin_transaction()
    for i, value in enumerate(values):
        client.produce(topic, value=value, partition=i % settings.topic_partitions)
    client.commit_transaction(30)
    wait_for_commit_markers(settings, topic)


def validated_events(n: int, seed: int) -> list[bytes]:
    return [validate_bytes(p).to_json_bytes() for p in generate_payloads(n, days=1, seed=seed)]


def dead_letter(payload: bytes, offset: int) -> DeadLetter:
    return DeadLetter.build(
        payload,
        ValidationError("malformed_json", "payload is not JSON"),
        topic="events.raw",
        partition=0,
        offset=offset,
        received_at=datetime(2024, 1, 1, tzinfo=UTC),
    )


def test_next_offset_stops_at_the_runs_end() -> None:
    # The position passed records written after the run read its end offsets: stop at the end.
    assert lake.next_offset(reached=9, position=15, end=10) == 10
    # A transaction marker was skipped inside the range: follow the position.
    assert lake.next_offset(reached=8, position=9, end=10) == 9
    # Never backwards.
    assert lake.next_offset(reached=9, position=4, end=10) == 9


def test_dead_letter_columns_are_the_envelope_fields() -> None:
    # pl.DataFrame(rows, schema=...) drops keys the schema lacks: a new envelope field must be
    # added to the lake's columns, in the envelope's order.
    assert list(lake.DEAD_LETTER_COLUMNS) == [f.name for f in fields(DeadLetter)]
    assert lake.DEAD_LETTER_COLUMNS["payload_bytes"] == pl.Int64()
    assert lake.DEAD_LETTER_COLUMNS["payload_truncated"] == pl.Boolean()


def test_dead_letters_decode_every_field_and_older_envelopes() -> None:
    letters = [dead_letter(b"{oops", 1), dead_letter(b"y" * (MAX_MESSAGE_BYTES + 5), 2)]
    old = asdict(dead_letter(b"[", 3))
    del old["payload_bytes"], old["payload_truncated"]  # written before those fields existed

    frame = lake.DECODERS["invalid"](
        [*(d.to_json_bytes() for d in letters), json.dumps(old).encode()]
    )

    assert frame.to_dicts() == [
        asdict(letters[0]),
        asdict(letters[1]),
        {**old, "payload_bytes": None, "payload_truncated": None},
    ]
    assert frame["payload_truncated"].to_list()[:2] == [False, True]


@services
def test_landing_commits_only_what_it_read_while_the_topic_grows(
    broker: Broker, tmp_path: Path
) -> None:
    settings = own_topic(broker.settings, tmp_path, "validated")
    topic, table = settings.topic_validated, lake.bronze_path(settings, "events")
    events = validated_events(300, seed=11)
    produce_in_transaction(settings, topic, events[:200])
    ends_before = end_offsets(settings, topic)

    grown: list[int] = []

    def grow_topic(_read: int) -> None:
        # Records written while the landing runs are past its range: the next run lands them.
        if not grown:
            produce_in_transaction(settings, topic, events[200:])
            grown.append(1)

    first = lake.land_topic(settings, topic, table, "validated", progress=grow_topic)
    assert grown
    assert first.rows == 200
    assert first.end_offsets == ends_before  # not the consumer's position past the new records

    second = lake.land_topic(settings, topic, table, "validated")
    assert second.start_offsets == ends_before
    assert second.rows == 100

    ends = end_offsets(settings, topic)
    assert lake.landed_offsets(table, topic, topic_id(settings, topic), sorted(ends)) == ends
    bronze = lake.read_bronze(table)
    records = read_topic(settings, topic)
    landed = sorted(zip(bronze["kafka_partition"], bronze["kafka_offset"], strict=True))
    assert landed == sorted((r.partition, r.offset) for r in records)  # each offset once
    assert sorted(bronze["event_id"]) == sorted(json.loads(e)["event_id"] for e in events)


@services
def test_a_recreated_topic_lands_from_offset_0_and_the_table_keeps_its_history(
    broker: Broker, tmp_path: Path
) -> None:
    """The embedded broker empties its topics on restart: the new incarnation (new topic id,
    offsets from 0) lands in full beside the old one; nothing is skipped or refused."""
    settings = own_topic(broker.settings, tmp_path, "validated")
    topic, table = settings.topic_validated, lake.bronze_path(settings, "events")
    old_events, new_events = validated_events(30, seed=12), validated_events(20, seed=13)
    produce_in_transaction(settings, topic, old_events)
    old_id = topic_id(settings, topic)
    assert lake.land_topic(settings, topic, table, "validated").rows == 30

    client = admin(settings)
    client.delete_topics([topic], operation_timeout=15)[topic].result()
    deadline = time.monotonic() + 15
    while topic in client.list_topics(timeout=5).topics and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ensure_topics(settings) == [topic]
    new_id = topic_id(settings, topic)
    assert new_id != old_id
    produce_in_transaction(settings, topic, new_events)

    again = lake.land_topic(settings, topic, table, "validated")
    assert again.start_offsets == dict.fromkeys(again.start_offsets, 0)
    assert again.rows == 20
    bronze = lake.read_bronze(table)
    assert sorted(bronze["event_id"]) == sorted(
        json.loads(e)["event_id"] for e in old_events + new_events
    )
    assert bronze.group_by("kafka_topic_id").len().sort("len")["len"].to_list() == [20, 30]
    assert bronze.select("kafka_topic_id", "kafka_partition", "kafka_offset").n_unique() == 50
    assert lake.land_topic(settings, topic, table, "validated").rows == 0


@services
def test_landing_refuses_a_topic_behind_its_table(broker: Broker, tmp_path: Path) -> None:
    """Same topic id but fewer records than landed: the broker lost acknowledged records."""
    settings = own_topic(broker.settings, tmp_path, "validated")
    topic, table = settings.topic_validated, lake.bronze_path(settings, "events")
    produce_in_transaction(settings, topic, validated_events(30, seed=14))
    landed = lake.land_topic(settings, topic, table, "validated").end_offsets
    incarnation = topic_id(settings, topic)
    # What the table would hold had the broker acknowledged 1,000 more records per partition
    # and then lost them: landed offsets beyond the topic's end, for the same topic id.
    ahead = {p: o + 1000 for p, o in landed.items()}
    write_deltalake(
        table,
        lake.read_bronze(table).head(0).to_arrow(),
        mode="append",
        commit_properties=CommitProperties(
            app_transactions=[
                Transaction(lake.app_id(topic, incarnation, p), o) for p, o in ahead.items()
            ]
        ),
    )
    version = DeltaTable(table).version()

    with pytest.raises(lake.TopicBehindLake) as error:
        lake.land_topic(settings, topic, table, "validated")
    message = str(error.value)
    assert f"topic {topic!r} (id {incarnation}) is behind the bronze table {table}" in message
    for partition, offset in ahead.items():
        assert (
            f"partition {partition} was landed up to offset {offset} but now ends at offset "
            f"{landed[partition]}" in message
        )
    assert "broker lost acknowledged records" in message
    assert DeltaTable(table).version() == version  # nothing committed


@services
def test_dead_letters_append_to_a_table_from_before_the_new_fields(
    broker: Broker, tmp_path: Path
) -> None:
    settings = own_topic(broker.settings, tmp_path, "invalid")
    topic, table = settings.topic_invalid, lake.bronze_path(settings, "invalid_events")
    # A bronze_invalid table as landed before payload_bytes/payload_truncated existed.
    old_columns = {
        k: t
        for k, t in lake.DEAD_LETTER_COLUMNS.items()
        if k not in ("payload_bytes", "payload_truncated")
    }
    old_row = {k: v for k, v in asdict(dead_letter(b"old", 0)).items() if k in old_columns}
    old_frame = pl.DataFrame(
        [{**old_row, "kafka_partition": 0, "kafka_offset": 0, "landed_at": datetime(2024, 1, 1)}],
        schema={**old_columns, **lake.KAFKA_COLUMNS},
    )
    write_deltalake(table, old_frame.to_arrow())

    letters = [dead_letter(b"{new", 1), dead_letter(b"z" * (MAX_MESSAGE_BYTES + 1), 2)]
    older_envelope = {k: v for k, v in asdict(dead_letter(b"[", 3)).items() if k in old_columns}
    values = [*(d.to_json_bytes() for d in letters), json.dumps(older_envelope).encode()]
    produce_in_transaction(settings, topic, values)

    result = lake.land_topic(settings, topic, table, "invalid")

    assert result.rows == 3
    bronze = lake.read_bronze(table)
    assert bronze.schema["payload_bytes"] == pl.Int64()
    assert bronze.schema["payload_truncated"] == pl.Boolean()
    by_payload = {row["payload"]: row for row in bronze.to_dicts()}
    assert len(by_payload) == 4
    for payload in ("old", "["):  # the old row and the envelope without the new fields
        assert by_payload[payload]["payload_bytes"] is None
        assert by_payload[payload]["payload_truncated"] is None
    for letter in letters:
        row = by_payload[letter.payload]
        assert (row["payload_bytes"], row["payload_truncated"]) == (
            letter.payload_bytes,
            letter.payload_truncated,
        )
    assert by_payload["z" * MAX_MESSAGE_BYTES]["payload_truncated"] is True


@services
def test_a_concurrent_landing_is_refused_and_nothing_lands_twice(
    broker: Broker, tmp_path: Path
) -> None:
    """A second landing commits while the first is still reading: the first one's commit is
    refused (Delta's concurrent-transaction check on the app ids), so no record lands twice."""
    settings = own_topic(broker.settings, tmp_path, "validated")
    topic, table = settings.topic_validated, lake.bronze_path(settings, "events")
    events = validated_events(400, seed=15)
    produce_in_transaction(settings, topic, events[:100])
    assert lake.land_topic(settings, topic, table, "validated").rows == 100  # the table exists
    produce_in_transaction(settings, topic, events[100:])

    inner: list[lake.LandingResult] = []

    def land_concurrently(_read: int) -> None:
        if not inner:
            inner.append(lake.land_topic(settings, topic, table, "validated"))

    with pytest.raises(lake.ConcurrentLanding, match="committed while this one ran"):
        lake.land_topic(settings, topic, table, "validated", progress=land_concurrently)
    assert inner[0].rows == 300
    bronze = lake.read_bronze(table)
    assert sorted(bronze["event_id"]) == sorted(json.loads(e)["event_id"] for e in events)
    assert lake.land_topic(settings, topic, table, "validated").rows == 0


LAND_AND_HANG = """
import sys, time
from easymlops import lake
from easymlops.settings import Settings

settings = Settings(lake_uri=sys.argv[2], topic_validated=sys.argv[1])
def hang(read):
    print(read, flush=True)
    time.sleep(3600)  # killed here: the records are read, nothing is committed
lake.land_topic(settings, sys.argv[1], sys.argv[3], "validated", progress=hang)
"""


@services
def test_kill_9_mid_landing_then_rerun_gives_exact_counts(broker: Broker, tmp_path: Path) -> None:
    settings = own_topic(broker.settings, tmp_path, "validated")
    topic, table = settings.topic_validated, lake.bronze_path(settings, "events")
    events = validated_events(2000, seed=16)
    produce_in_transaction(settings, topic, events[:500])
    assert lake.land_topic(settings, topic, table, "validated").rows == 500
    produce_in_transaction(settings, topic, events[500:])
    version = DeltaTable(table).version()

    landing = subprocess.Popen(
        [sys.executable, "-c", LAND_AND_HANG, topic, settings.lake_uri, table],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert landing.stdout is not None
        assert int(landing.stdout.readline()) > 0  # mid-landing: records read, none committed
        landing.send_signal(signal.SIGKILL)
        landing.wait(10)
    finally:
        if landing.poll() is None:
            landing.kill()
    assert DeltaTable(table).version() == version

    assert lake.land_topic(settings, topic, table, "validated").rows == 1500
    bronze = lake.read_bronze(table)
    assert sorted(bronze["event_id"]) == sorted(json.loads(e)["event_id"] for e in events)
    assert bronze.select("kafka_partition", "kafka_offset").n_unique() == 2000
