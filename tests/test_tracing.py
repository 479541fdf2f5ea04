"""A trace follows an event across processes: `easymlops produce` starts it and puts the W3C
`traceparent` in each record's Kafka headers; the validator continues it and puts its own span's
traceparent on the records it writes; the lake landing continues it from those, on the real
broker. Spans are read from an in-memory exporter."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, TopicPartition
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from easymlops import lake, telemetry
from easymlops.cli import app
from easymlops.kafka import ensure_topics, partitions
from easymlops.settings import Settings, get_settings
from easymlops.validate import run_validator
from tests.conftest import topic_env

pytestmark = pytest.mark.services

EVENTS = 2500  # three producer chunks: 1000, 1000, 500


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.use_tracer_provider(provider)
    try:
        yield exporter
    finally:
        telemetry.use_tracer_provider(None)


def named(spans: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [span for span in spans.get_finished_spans() if span.name == name]


def test_a_trace_started_by_produce_is_continued_by_the_validator_and_the_landing(
    stack: Settings,
    spans: InMemorySpanExporter,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    name = f"test.trace.{uuid.uuid4().hex[:8]}"
    settings = stack.model_copy(
        update={f"topic_{kind}": f"{name}.{kind}" for kind in ("raw", "validated", "invalid")}
    )
    ensure_topics(settings)
    for key, value in topic_env(settings).items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(
            app, ["produce", "--events", str(EVENTS), "--invalid-ratio", "0.02"]
        )
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output

    produced = named(spans, "produce")
    assert [span.parent for span in produced] == [None] * 3  # each chunk starts a trace
    assert len({span.context.trace_id for span in produced}) == 3

    # The records carry their chunk's span as parent.
    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"{name}-reader",
            "enable.auto.commit": False,
        }
    )
    topic = settings.topic_raw
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions(settings, topic)])
    headers: list[str] = []
    try:
        while len(headers) < EVENTS:
            batch = consumer.consume(1000, timeout=10)
            assert batch, f"only {len(headers)} of {EVENTS} records read back"
            for message in batch:
                assert message.error() is None, message.error()
                headers += [v.decode() for k, v in message.headers() or [] if k == "traceparent"]
    finally:
        consumer.close()
    assert len(headers) == EVENTS
    by_header = {telemetry.traceparent(span): span for span in produced}  # type: ignore[arg-type]
    assert set(headers) == set(by_header)

    stats = run_validator(settings, idle_seconds=3, session_features=False)
    assert stats.consumed == EVENTS

    validated = named(spans, "validate")
    assert validated
    producer_spans = {span.context.span_id: span for span in produced}
    for span in validated:
        assert span.parent is not None, "the validator started a trace of its own"
        parent = producer_spans[span.parent.span_id]
        assert span.context.trace_id == parent.context.trace_id
        assert span.parent.is_remote
    counted: dict[int, int] = {}
    for span in validated:
        assert span.attributes is not None
        count = int(str(span.attributes["messaging.batch.message_count"]))
        counted[span.context.trace_id] = counted.get(span.context.trace_id, 0) + count
    assert sorted(counted.values()) == [500, 1000, 1000]
    assert set(counted) == {span.context.trace_id for span in produced}

    # The landing continues each trace from the validator's span its records carry.
    landed = lake.land_topic(
        settings, settings.topic_validated, str(tmp_path / "bronze"), "validated"
    )
    assert landed.rows == stats.valid
    landing = named(spans, "land")
    validator_spans = {span.context.span_id: span for span in validated}
    for span in landing:
        assert span.parent is not None and span.parent.is_remote
        parent = validator_spans[span.parent.span_id]  # a validator span, not the producer's
        assert span.context.trace_id == parent.context.trace_id
    landed_per_trace: dict[int, int] = {}
    for span in landing:
        assert span.attributes is not None
        count = int(str(span.attributes["messaging.batch.message_count"]))
        trace_id = span.context.trace_id
        landed_per_trace[trace_id] = landed_per_trace.get(trace_id, 0) + count
    assert sum(landed_per_trace.values()) == stats.valid  # every landed record was traced
    assert set(landed_per_trace) == {span.context.trace_id for span in produced}
