"""The local stream validator: events.raw -> events.validated | events.invalid, exactly once.

Each consumed batch is validated, produced and its consumer offsets committed inside one Kafka
transaction, so a crash at any point neither loses nor duplicates an event: valid + invalid =
consumed, always. The Flink job in flink_jobs/ applies the same rules (easymlops.schema).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)

from easymlops.kafka import consumer, coordinates, partitions, producer
from easymlops.schema import DeadLetter, ValidationError, validate_bytes
from easymlops.settings import Settings

GROUP_ID = "easymlops-validator"


@dataclass
class ValidationStats:
    consumed: int = 0
    valid: int = 0
    invalid: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def rate(self) -> float:
        return self.consumed / self.seconds if self.seconds else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "consumed": self.consumed,
            "valid": self.valid,
            "invalid": self.invalid,
            "errors": dict(self.errors),
            "seconds": round(self.seconds, 3),
            "events_per_second": round(self.rate, 1),
        }


def run_validator(
    settings: Settings,
    *,
    until_idle: bool = True,
    idle_seconds: float = 5.0,
    batch_size: int = 5000,
    progress: Callable[[ValidationStats], None] | None = None,
    should_stop: Callable[[], bool] = lambda: False,
) -> ValidationStats:
    """Validate until the topic has been idle for `idle_seconds` (or forever if not until_idle)."""
    stats = ValidationStats()
    source = consumer(settings, GROUP_ID)
    sink = producer(settings, **{"transactional.id": f"{GROUP_ID}-{settings.topic_raw}"})
    sink.init_transactions(30)
    # One local runner owns every partition: it assigns them itself and resumes from the group's
    # committed offsets instead of joining the group, whose first join costs 3-25 s on Tansu. A
    # second runner with the same transactional id fences the first, so two never both commit.
    topic_partitions = [
        TopicPartition(settings.topic_raw, p) for p in partitions(settings, settings.topic_raw)
    ]
    committed = source.committed(topic_partitions, timeout=30)
    source.assign(
        [
            TopicPartition(
                tp.topic, tp.partition, tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            )
            for tp in committed
        ]
    )
    started = time.monotonic()
    last_activity = started
    try:
        while not should_stop():
            messages = source.consume(batch_size, timeout=0.5)
            if not messages:
                if until_idle and time.monotonic() - last_activity > idle_seconds:
                    break
                continue
            last_activity = time.monotonic()
            _process_batch(settings, messages, source, sink, stats)
            if progress:
                stats.seconds = time.monotonic() - started
                progress(stats)
    finally:
        stats.seconds = time.monotonic() - started
        source.close()
        sink.flush(10)
    return stats


def _process_batch(
    settings: Settings,
    messages: list[Message],
    source: Consumer,
    sink: Producer,
    stats: ValidationStats,
) -> None:
    received_at = datetime.now(UTC)
    sink.begin_transaction()
    batch_valid = batch_invalid = 0
    batch_errors: Counter[str] = Counter()
    next_offsets: dict[tuple[str, int], int] = {}
    for message in messages:
        error = message.error()
        if error is not None:
            if error.code() == KafkaError._PARTITION_EOF:
                continue
            sink.abort_transaction()
            raise KafkaException(error)
        topic, partition, offset = coordinates(message)
        payload = message.value()
        try:
            event = validate_bytes(payload)
        except ValidationError as exc:
            letter = DeadLetter.build(
                payload,
                exc,
                topic=topic,
                partition=partition,
                offset=offset,
                received_at=received_at,
            )
            sink.produce(settings.topic_invalid, key=message.key(), value=letter.to_json_bytes())
            batch_invalid += 1
            batch_errors[exc.error_type] += 1
        else:
            # Keyed by session so one session's events stay ordered in one partition.
            sink.produce(
                settings.topic_validated,
                key=event.user_session.encode(),
                value=event.to_json_bytes(),
            )
            batch_valid += 1
        next_offsets[(topic, partition)] = offset + 1
    sink.send_offsets_to_transaction(
        [TopicPartition(t, p, o) for (t, p), o in next_offsets.items()],
        source.consumer_group_metadata(),
        30,
    )
    sink.commit_transaction(60)
    # Counted only after the commit, so the stats never include an aborted batch.
    stats.consumed += batch_valid + batch_invalid
    stats.valid += batch_valid
    stats.invalid += batch_invalid
    stats.errors.update(batch_errors)
