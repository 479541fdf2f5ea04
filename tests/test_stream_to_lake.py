"""Producer -> broker -> validator -> validated/dead-letter topics -> bronze -> silver, on the
real embedded broker. The session stack (and its topics) is shared by other tests, so counts
on topics are deltas; the lake is this test's own, so bronze must hold exactly the topics."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import polars as pl
import pytest
from confluent_kafka import Consumer, TopicPartition

from easymlops import lake
from easymlops.csv_replay import read_csv_events
from easymlops.generator import generate_payloads
from easymlops.kafka import coordinates, end_offsets, partitions, topic_id
from easymlops.produce import produce_payloads
from easymlops.schema import MAX_MESSAGE_BYTES
from easymlops.settings import Settings
from easymlops.validate import run_validator
from tests.conftest import wait_for_commit_markers

pytestmark = pytest.mark.services

FIXTURE_CSV = Path(__file__).parent / "fixtures" / "ecommerce_sample.csv"


class Record(NamedTuple):
    partition: int
    offset: int
    value: bytes


def read_topic(settings: Settings, topic: str) -> list[Record]:
    """Every committed record of a topic, read by an independent client until it idles."""
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "test-reader",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    reader.assign([TopicPartition(topic, p, 0) for p in partitions(settings, topic)])
    records: list[Record] = []
    idle = 0
    while idle < 4:
        messages = reader.consume(10_000, timeout=0.5)
        idle = 0 if messages else idle + 1
        for message in messages:
            assert message.error() is None, message.error()
            _, partition, offset = coordinates(message)
            records.append(Record(partition, offset, message.value() or b""))
    reader.close()
    return records


def test_generated_events_flow_to_bronze_and_silver_exactly_once(
    stack: Settings, tmp_path: Path
) -> None:
    valid_before = len(read_topic(stack, stack.topic_validated))
    invalid_before = len(read_topic(stack, stack.topic_invalid))

    # Dead-lettered with its payload truncated; the marker finds it among other tests' letters.
    oversized = b"lake-test " + b"x" * MAX_MESSAGE_BYTES
    payloads = [*generate_payloads(3000, days=3, seed=5, invalid_ratio=0.05), oversized]
    produced = produce_payloads(stack, payloads)
    assert produced.delivered == 3001 and produced.failed == 0

    stats = run_validator(stack, idle_seconds=3)
    assert stats.consumed >= 3001  # other tests may have left raw events before this one
    assert stats.valid + stats.invalid == stats.consumed
    assert stats.invalid >= 151

    valid = read_topic(stack, stack.topic_validated)
    invalid = read_topic(stack, stack.topic_invalid)
    assert len(valid) - valid_before == stats.valid
    assert len(invalid) - invalid_before == stats.invalid

    # A second validator run finds nothing new: offsets were committed with the output.
    again = run_validator(stack, idle_seconds=2)
    assert again.consumed == 0

    # Bronze, in a lake of this test's own: exactly the topic's records, each once.
    own_lake = stack.model_copy(update={"lake_uri": str(tmp_path / "lake")})
    table = lake.bronze_path(own_lake, "events")
    topic = stack.topic_validated
    # The validator's last commit markers may still be on their way (see the helper).
    wait_for_commit_markers(stack, topic)
    ends = end_offsets(stack, topic)
    first = lake.land_topic(own_lake, topic, table, "validated")
    assert first.end_offsets == ends
    committed = lake.landed_offsets(table, topic, topic_id(stack, topic), sorted(ends))
    assert committed == ends  # as committed in the log
    assert first.rows == len(valid)
    bronze = lake.read_bronze(table)
    landed = sorted(zip(bronze["kafka_partition"], bronze["kafka_offset"], strict=True))
    assert landed == sorted((r.partition, r.offset) for r in valid)
    topic_ids = sorted(json.loads(r.value)["event_id"] for r in valid)
    assert sorted(bronze["event_id"]) == topic_ids

    second = lake.land_topic(own_lake, topic, table, "validated")
    assert second.rows == 0 and second.start_offsets == ends
    assert lake.DeltaTable(table).version() == first.delta_version  # nothing committed

    silver = lake.build_silver(own_lake)
    assert silver.rows == len(set(topic_ids))
    assert silver.duplicates_removed == len(topic_ids) - len(set(topic_ids))
    assert sorted(lake.read_silver(own_lake)["event_id"]) == sorted(set(topic_ids))
    rebuilt = lake.build_silver(own_lake)
    assert rebuilt.rows == silver.rows  # overwrite, not append
    assert lake.read_silver(own_lake).height == silver.rows
    assert len(rebuilt.dates) >= 3

    # Dead letters land with every envelope field, the payload size and truncation included.
    dead_table = lake.bronze_path(own_lake, "invalid_events")
    lake.land_topic(own_lake, stack.topic_invalid, dead_table, "invalid")
    dead = lake.read_bronze(dead_table).drop("landed_at").sort("kafka_partition", "kafka_offset")
    invalid_id = topic_id(stack, stack.topic_invalid)
    expected = [
        {
            **json.loads(r.value),
            "kafka_topic_id": invalid_id,
            "kafka_partition": r.partition,
            "kafka_offset": r.offset,
        }
        for r in sorted(invalid)
    ]
    assert dead.to_dicts() == expected
    ours = dead.filter(pl.col("payload").str.starts_with("lake-test "))
    assert ours.select("error_type", "payload_bytes", "payload_truncated").rows() == [
        ("message_too_large", len(oversized), True)
    ]
    assert ours["payload"].str.len_bytes().to_list() == [MAX_MESSAGE_BYTES]


def test_csv_replay_lands_every_well_formed_row(stack: Settings) -> None:
    rows = list(read_csv_events(FIXTURE_CSV))
    run_validator(stack, idle_seconds=2)  # drain whatever earlier tests left
    seen = {(r.partition, r.offset) for r in read_topic(stack, stack.topic_validated)}

    produced = produce_payloads(stack, rows)
    assert produced.delivered == len(rows)
    stats = run_validator(stack, idle_seconds=3)

    assert stats.consumed == len(rows)
    assert stats.invalid == 2  # the two malformed rows at the end of the fixture
    validated = [
        json.loads(r.value)
        for r in read_topic(stack, stack.topic_validated)
        if (r.partition, r.offset) not in seen
    ]
    assert len(validated) == len(rows) - 2
    assert any(v["category_code"] is None for v in validated)
    assert any(v["brand"] is None for v in validated)
