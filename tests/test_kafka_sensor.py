"""The Kafka landing sensors against a real broker: a tick reads end offsets only, requests one
landing run per new range (run key = the range), and the run lands exactly that range, once.
Each test uses a topic and a lake of its own (the session stack is shared)."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from test_lake_landing import dead_letter, own_topic, produce_in_transaction, validated_events
from test_stream_to_lake import read_topic

from easymlops import lake
from easymlops.kafka import end_offsets, topic_id
from easymlops.settings import Settings, get_settings
from easymlops_assets.defs.lakehouse.assets import bronze_events, bronze_invalid_events
from easymlops_assets.defs.lakehouse.sensors import (
    bronze_events_sensor,
    bronze_invalid_events_sensor,
)
from easymlops_assets.resources import PlatformConfig
from tests.conftest import Broker

pytestmark = pytest.mark.services


@pytest.fixture
def point_at(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Settings], None]]:
    """Point get_settings() (read by the sensors and assets) at a test's own topics and lake."""

    def point(settings: Settings) -> None:
        monkeypatch.setenv("EASYMLOPS_TOPIC_VALIDATED", settings.topic_validated)
        monkeypatch.setenv("EASYMLOPS_TOPIC_INVALID", settings.topic_invalid)
        monkeypatch.setenv("EASYMLOPS_LAKE_URI", settings.lake_uri)
        get_settings.cache_clear()

    yield point
    monkeypatch.undo()
    get_settings.cache_clear()


def tick(sensor: dg.SensorDefinition, cursor: str | None) -> dg.SensorResult | dg.SkipReason:
    result = sensor(dg.build_sensor_context(cursor=cursor), platform=PlatformConfig())
    assert isinstance(result, dg.SensorResult | dg.SkipReason)
    return result


def requested(result: dg.SensorResult | dg.SkipReason) -> tuple[dg.RunRequest, str]:
    assert isinstance(result, dg.SensorResult), result
    assert result.run_requests is not None and len(result.run_requests) == 1
    assert result.cursor is not None
    request = result.run_requests[0]
    assert isinstance(request, dg.RunRequest)
    return request, result.cursor


def land(asset: dg.AssetsDefinition, run_config: Mapping[str, Any] | None = None) -> int:
    """Run the asset in process as the requested run would; the rows it landed."""
    outcome = dg.materialize(
        [asset],
        run_config=dict(run_config or {}),
        instance=dg.DagsterInstance.ephemeral(),
        resources={"platform": PlatformConfig()},
    )
    assert outcome.success
    [materialization] = outcome.asset_materializations_for_node(asset.op.name)
    return int(materialization.metadata["dagster/row_count"].value)  # type: ignore[arg-type]


def landed_records(table: str) -> list[tuple[int, int]]:
    bronze = lake.read_bronze(table)
    return sorted(zip(bronze["kafka_partition"], bronze["kafka_offset"], strict=True))


def records_below(settings: Settings, topic: str, ends: dict[int, int]) -> list[tuple[int, int]]:
    return sorted(
        (r.partition, r.offset) for r in read_topic(settings, topic) if r.offset < ends[r.partition]
    )


def expected_request(
    topic: str, incarnation: str, start: dict[int, int], end: dict[int, int], op: str
) -> tuple[str, dict[str, Any]]:
    ranges = [",".join(f"{p}={o}" for p, o in sorted(r.items())) for r in (start, end)]
    config = {"until_offsets": {str(p): o for p, o in end.items()}}
    return f"{topic}@{incarnation}:{ranges[0]}-{ranges[1]}", {"ops": {op: {"config": config}}}


def test_sensor_requests_each_new_range_and_the_run_lands_exactly_it(
    broker: Broker, tmp_path: Path, point_at: Callable[[Settings], None]
) -> None:
    settings = own_topic(broker.settings, tmp_path, "validated")
    point_at(settings)
    topic, table = settings.topic_validated, lake.bronze_path(settings, "events")
    incarnation = topic_id(settings, topic)
    events = validated_events(100, seed=21)

    # An empty topic: nothing moved, nothing requested.
    assert isinstance(tick(bronze_events_sensor, None), dg.SkipReason)

    produce_in_transaction(settings, topic, events[:30])
    ends1 = end_offsets(settings, topic)
    first, cursor1 = requested(tick(bronze_events_sensor, None))
    zeros = dict.fromkeys(ends1, 0)
    assert (first.run_key, first.run_config) == expected_request(
        topic, incarnation, zeros, ends1, "bronze_events"
    )
    assert first.asset_selection == [bronze_events.key]
    assert json.loads(cursor1) == {
        "topic_id": incarnation,
        "offsets": {str(p): o for p, o in ends1.items()},
    }
    # Nothing moved past the cursor: no request.
    assert isinstance(tick(bronze_events_sensor, cursor1), dg.SkipReason)

    produce_in_transaction(settings, topic, events[30:50])
    ends2 = end_offsets(settings, topic)
    second, cursor2 = requested(tick(bronze_events_sensor, cursor1))
    assert second.run_key == expected_request(topic, incarnation, ends1, ends2, "x")[0]
    produce_in_transaction(settings, topic, events[50:80])
    ends3 = end_offsets(settings, topic)
    third, _ = requested(tick(bronze_events_sensor, cursor2))
    assert third.run_key == expected_request(topic, incarnation, ends2, ends3, "x")[0]

    # The first run lands its range only, though the topic holds more by now.
    assert land(bronze_events, first.run_config) == 30
    assert landed_records(table) == records_below(settings, topic, ends1)
    # The same request again (a re-run) lands nothing.
    assert land(bronze_events, first.run_config) == 0
    assert landed_records(table) == records_below(settings, topic, ends1)
    # The third range before the second: it lands from what the table recorded, the gap too.
    assert land(bronze_events, third.run_config) == 50
    assert landed_records(table) == records_below(settings, topic, ends3)
    assert land(bronze_events, second.run_config) == 0

    # By hand, with no config: everything up to the current end offsets.
    produce_in_transaction(settings, topic, events[80:])
    assert land(bronze_events) == 20
    assert landed_records(table) == sorted(
        (r.partition, r.offset) for r in read_topic(settings, topic)
    )
    assert sorted(lake.read_bronze(table)["event_id"]) == sorted(
        json.loads(e)["event_id"] for e in events
    )


def test_invalid_events_land_the_same_way(
    broker: Broker, tmp_path: Path, point_at: Callable[[Settings], None]
) -> None:
    settings = own_topic(broker.settings, tmp_path, "invalid")
    point_at(settings)
    topic, table = settings.topic_invalid, lake.bronze_path(settings, "invalid_events")
    produce_in_transaction(
        settings, topic, [dead_letter(b"{", i).to_json_bytes() for i in range(6)]
    )
    ends = end_offsets(settings, topic)

    request, cursor = requested(tick(bronze_invalid_events_sensor, None))
    assert (request.run_key, request.run_config) == expected_request(
        topic, topic_id(settings, topic), dict.fromkeys(ends, 0), ends, "bronze_invalid_events"
    )
    assert request.asset_selection == [bronze_invalid_events.key]
    produce_in_transaction(settings, topic, [dead_letter(b"[", 9).to_json_bytes()])

    assert land(bronze_invalid_events, request.run_config) == 6
    assert landed_records(table) == records_below(settings, topic, ends)
    assert land(bronze_invalid_events, request.run_config) == 0
    following, _ = requested(tick(bronze_invalid_events_sensor, cursor))
    assert land(bronze_invalid_events, following.run_config) == 1
