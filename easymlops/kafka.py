"""Kafka client helpers shared by producers, the validator, Dagster assets and tests."""

from __future__ import annotations

import logging
import time
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from easymlops.settings import Settings


def coordinates(message: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed message (always set, unlike the client's
    Optional-typed accessors suggest)."""
    topic, partition, offset = message.topic(), message.partition(), message.offset()
    assert topic is not None and partition is not None and offset is not None
    return topic, partition, offset


# librdkafka logs to stderr by default; routed through logging, its connection retries do not
# bury the one-line error the CLI prints when the broker is down.
CLIENT_LOGGER = logging.getLogger("easymlops.kafka.client")


def admin(settings: Settings) -> AdminClient:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "logger": CLIENT_LOGGER,
    }
    return AdminClient(config)


def ensure_topics(settings: Settings, timeout: float = 15.0) -> list[str]:
    """Create the platform's topics that do not exist yet; return the names created."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=timeout).topics)
    missing = [t for t in settings.topics if t not in existing]
    if not missing:
        return []
    futures = client.create_topics(
        [
            NewTopic(t, num_partitions=settings.topic_partitions, replication_factor=1)
            for t in missing
        ],
        operation_timeout=timeout,
    )
    created = []
    for topic, future in futures.items():
        try:
            future.result()
            created.append(topic)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    _wait_visible(client, missing, timeout, settings.bootstrap_servers)
    return created


def _wait_visible(client: AdminClient, topics: list[str], timeout: float, bootstrap: str) -> None:
    """Return once every topic is in the broker's metadata with a leader for each partition.
    Apache Kafka acknowledges a CreateTopics before its metadata shows the topic (Tansu does
    not), and a client asking right after would be told the topic does not exist."""
    deadline = time.monotonic() + timeout
    pending = list(topics)
    while pending:
        meta = client.list_topics(timeout=timeout)
        pending = [
            t
            for t in pending
            if t not in meta.topics
            or meta.topics[t].error is not None
            or any(p.leader < 0 for p in meta.topics[t].partitions.values())
        ]
        if pending and time.monotonic() > deadline:
            raise KafkaUnavailable(
                f"topics {', '.join(pending)} were created on {bootstrap} but "
                f"did not appear in its metadata within {timeout:g} s"
            )
        if pending:
            time.sleep(0.1)


def producer(settings: Settings, **overrides: Any) -> Producer:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "enable.idempotence": True,
        "linger.ms": 20,
        "batch.num.messages": 10000,
        "compression.type": "none",
        # Give up on a delivery after 60 s (default 300 s), so a dead broker is reported soon.
        "message.timeout.ms": 60_000,
        "logger": CLIENT_LOGGER,
    }
    config.update(overrides)
    return Producer(config)


def consumer(settings: Settings, group_id: str, **overrides: Any) -> Consumer:
    config: dict[str, Any] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        "isolation.level": "read_committed",
        # Tansu holds a new group's first join for about half the session timeout: the 45 s
        # default meant a 23 s wait before the first message; 6 s makes it about 3 s.
        "session.timeout.ms": 6000,
        "heartbeat.interval.ms": 500,
        "logger": CLIENT_LOGGER,
    }
    config.update(overrides)
    return Consumer(config)


# librdkafka does not always flag these retriable on an OffsetFetch, though they are.
_COORDINATOR_NOT_READY = frozenset(
    {
        KafkaError.NOT_COORDINATOR,
        KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        KafkaError.COORDINATOR_NOT_AVAILABLE,
    }
)


def committed_offsets(
    client: Consumer, wanted: list[TopicPartition], timeout: float = 30.0
) -> list[TopicPartition]:
    """The group's committed offsets of `wanted`, retrying the errors a broker gives while its
    group coordinator is still being elected or loading `__consumer_offsets` (NOT_COORDINATOR,
    COORDINATOR_LOAD_IN_PROGRESS...): Apache Kafka answers so for a few seconds after it
    starts, and librdkafka passes them on rather than retrying."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return client.committed(wanted, timeout=max(deadline - time.monotonic(), 1.0))
        except KafkaException as exc:
            error = exc.args[0]
            if not (
                isinstance(error, KafkaError)
                and (error.retriable() or error.code() in _COORDINATOR_NOT_READY)
            ):
                raise
            if time.monotonic() > deadline:
                raise KafkaUnavailable(
                    f"the group coordinator did not answer within {timeout:g} s ({error.str()})"
                ) from None
            time.sleep(0.2)


class KafkaUnavailable(RuntimeError):
    """The broker does not answer, or a topic the platform needs is missing."""


def partitions(settings: Settings, topic: str, timeout: float = 10.0) -> list[int]:
    try:
        meta = admin(settings).list_topics(topic, timeout=timeout)
    except KafkaException as exc:
        raise KafkaUnavailable(
            f"cannot reach Kafka at {settings.bootstrap_servers} ({exc.args[0]}); "
            "is the stack up? (`easymlops up`)"
        ) from None
    if topic not in meta.topics or meta.topics[topic].error is not None:
        raise KafkaUnavailable(
            f"topic {topic!r} does not exist on {settings.bootstrap_servers}; "
            "`easymlops up` creates the platform's topics"
        )
    return sorted(meta.topics[topic].partitions)


def topic_id(settings: Settings, topic: str, timeout: float = 10.0) -> str:
    """The topic's id (a UUID, base64 as Kafka prints it): a recreated topic gets a new one, so
    it tells one incarnation of a topic from the next (the embedded broker empties its topics
    on restart; offsets then start again from 0)."""
    partitions(settings, topic, timeout)  # the clear errors for no broker / no topic
    client = admin(settings)  # held until the result arrives: a collected client cancels it
    futures = client.describe_topics(TopicCollection([topic]), request_timeout=timeout)
    return str(futures[topic].result(timeout).topic_id)


def end_offsets(settings: Settings, topic: str, timeout: float = 10.0) -> dict[int, int]:
    """The true end offset (next offset to be written) of each partition.

    Tansu reports the high watermark as the base offset of the last record batch + 1, not the
    last record + 1, so the watermark alone undercounts. We read the last batch from
    `watermark - 1` and take the offset after its final record, which is correct on Kafka too.
    Every partition's tail is read at once, until the broker says end of partition (or, should
    it never say so, a second without records): a few milliseconds, not a second per partition.
    """
    parts = partitions(settings, topic, timeout)
    probe = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": "easymlops-end-offsets",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    try:
        ends: dict[int, int] = {}
        tails: list[TopicPartition] = []
        for part in parts:
            low, high = probe.get_watermark_offsets(
                TopicPartition(topic, part), timeout=timeout, cached=False
            )
            ends[part] = high
            if high > low:
                tails.append(TopicPartition(topic, part, high - 1))
        if not tails:
            return ends
        probe.assign(tails)
        pending = {tp.partition for tp in tails}
        quiet_since = time.monotonic()
        while pending and time.monotonic() - quiet_since < 1.0:
            messages = probe.consume(10_000, timeout=0.2)
            if messages:
                quiet_since = time.monotonic()
            for message in messages:
                error = message.error()
                if error is None:
                    _, part, offset = coordinates(message)
                    ends[part] = max(ends[part], offset + 1)
                elif error.code() == KafkaError._PARTITION_EOF:
                    pending.discard(message.partition() or 0)
                # other errors are the client's own (a broker connection lost, retried by
                # librdkafka) and carry no partition: the quiet timeout ends the wait
        return ends
    finally:
        probe.close()
