"""The Kafka client helpers' handling of a broker that is up but not ready.

Apache Kafka answers an offset fetch with NOT_COORDINATOR for a few seconds after it starts,
while it elects the coordinator of `__consumer_offsets`; a CI run lost two tests to it. A real
broker cannot be made to answer so on demand, so these tests put a client in front of
`committed_offsets` that answers as that broker did, then as a ready one."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from easymlops.kafka import KafkaUnavailable, committed_offsets

WANTED = [TopicPartition("events.raw", 0)]


class ScriptedClient:
    """Answers `committed()` with the given errors in turn, then with offset 7."""

    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)
        self.calls = 0

    def committed(self, partitions: list[TopicPartition], timeout: float) -> list[TopicPartition]:
        self.calls += 1
        if self.errors:
            raise KafkaException(KafkaError(self.errors.pop(0)))
        return [TopicPartition(tp.topic, tp.partition, 7) for tp in partitions]


def test_committed_offsets_waits_out_a_coordinator_that_is_not_ready() -> None:
    client = ScriptedClient(KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS)
    offsets = committed_offsets(client, WANTED, timeout=10)  # type: ignore[arg-type]
    assert [tp.offset for tp in offsets] == [7]
    assert client.calls == 3


def test_committed_offsets_raises_other_errors_at_once() -> None:
    client = ScriptedClient(KafkaError.GROUP_AUTHORIZATION_FAILED)
    with pytest.raises(KafkaException, match="GROUP_AUTHORIZATION_FAILED"):
        committed_offsets(client, WANTED, timeout=10)  # type: ignore[arg-type]
    assert client.calls == 1


def test_committed_offsets_names_the_cause_when_the_coordinator_never_comes() -> None:
    client = ScriptedClient(*[KafkaError.NOT_COORDINATOR] * 1000)
    with pytest.raises(KafkaUnavailable, match=r"did not answer within 0\.5 s.*[Cc]oordinator"):
        committed_offsets(client, WANTED, timeout=0.5)  # type: ignore[arg-type]
