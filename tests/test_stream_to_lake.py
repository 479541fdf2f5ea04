"""Producer -> broker -> validator -> validated/dead-letter topics -> bronze -> silver, on the
real embedded broker. Counts are deltas, since the session stack is shared by other tests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition

from easymlops import lake
from easymlops.csv_replay import read_csv_events
from easymlops.generator import generate_payloads
from easymlops.kafka import end_offsets, partitions
from easymlops.produce import produce_payloads
from easymlops.settings import Settings
from easymlops.validate import run_validator

pytestmark = pytest.mark.services

FIXTURE_CSV = Path(__file__).parent / "fixtures" / "ecommerce_sample.csv"


def read_topic(settings: Settings, topic: str) -> list[bytes]:
    """Every committed record of a topic, read by an independent client."""
    ends = end_offsets(settings, topic)
    reader = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "test-reader",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
        }
    )
    reader.assign([TopicPartition(topic, p, 0) for p in partitions(settings, topic)])
    values: list[bytes] = []
    idle = 0
    while idle < 4:
        messages = reader.consume(10_000, timeout=0.5)
        idle = 0 if messages else idle + 1
        values.extend(m.value() for m in messages if m.error() is None)
    reader.close()
    assert ends  # the topic exists
    return values


def test_generated_events_flow_to_bronze_and_silver_exactly_once(stack: Settings) -> None:
    valid_before = len(read_topic(stack, stack.topic_validated))
    invalid_before = len(read_topic(stack, stack.topic_invalid))

    produced = produce_payloads(stack, generate_payloads(3000, days=3, seed=5, invalid_ratio=0.05))
    assert produced.delivered == 3000 and produced.failed == 0

    stats = run_validator(stack, idle_seconds=3)
    assert stats.consumed >= 3000  # other tests may have left raw events before this one
    assert stats.valid + stats.invalid == stats.consumed
    assert stats.invalid >= 150

    valid = read_topic(stack, stack.topic_validated)
    invalid = read_topic(stack, stack.topic_invalid)
    assert len(valid) - valid_before == stats.valid
    assert len(invalid) - invalid_before == stats.invalid
    envelope = json.loads(invalid[-1])
    assert envelope["source_topic"] == stack.topic_raw
    assert {"error_type", "error_message", "source_partition", "source_offset", "payload"} <= set(
        envelope
    )

    # A second validator run finds nothing new: offsets were committed with the output.
    again = run_validator(stack, idle_seconds=2)
    assert again.consumed == 0

    table = lake.bronze_path(stack, "events")
    first = lake.land_topic(stack, stack.topic_validated, table, "validated")
    bronze = lake.read_bronze(table)
    assert bronze.height == len(valid)
    assert bronze.select("kafka_partition", "kafka_offset").n_unique() == bronze.height
    assert first.end_offsets == end_offsets(stack, stack.topic_validated) or first.rows == 0

    second = lake.land_topic(stack, stack.topic_validated, table, "validated")
    assert second.rows == 0
    assert lake.read_bronze(table).height == bronze.height

    silver = lake.build_silver(stack)
    assert silver.rows == bronze["event_id"].n_unique()
    rebuilt = lake.build_silver(stack)
    assert rebuilt.rows == silver.rows  # overwrite, not append
    assert len(rebuilt.dates) >= 3


def test_csv_replay_lands_every_well_formed_row(stack: Settings) -> None:
    rows = list(read_csv_events(FIXTURE_CSV))
    run_validator(stack, idle_seconds=2)  # drain whatever earlier tests left
    valid_before = len(read_topic(stack, stack.topic_validated))

    produced = produce_payloads(stack, rows)
    assert produced.delivered == len(rows)
    stats = run_validator(stack, idle_seconds=3)

    assert stats.consumed == len(rows)
    assert stats.invalid == 2  # the two malformed rows at the end of the fixture
    validated = [json.loads(v) for v in read_topic(stack, stack.topic_validated)[valid_before:]]
    assert len(validated) == len(rows) - 2
    assert any(v["category_code"] is None for v in validated)
    assert any(v["brand"] is None for v in validated)
