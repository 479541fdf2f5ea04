"""The session-feature writer on the real Redis: whatever order, chunking and replays the stream
delivers, each session's hash equals the fold of its distinct events (SessionState, the
definition Flink keeps in keyed state), and `apply` reports only the events that were new."""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import redis

from easymlops.features import session_key
from easymlops.generator import generate_events
from easymlops.schema import Event, validate_record
from easymlops.session_features import (
    IDS_PER_ENTRY,
    SessionFeatureWriter,
    SessionState,
    applied_key,
    applied_token,
)
from easymlops.settings import Settings

pytestmark = pytest.mark.services


@pytest.fixture
def client(stack: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(stack.redis, decode_responses=True)
    yield client
    client.close()


def own_sessions(events: list[Event]) -> list[Event]:
    """The events with session names of this test run, so no other test's keys interfere."""
    run = uuid.uuid4().hex[:8]
    return [replace(e, user_session=f"{run}-{e.user_session}") for e in events]


def expected_hashes(events: list[Event]) -> dict[str, dict[str, str]]:
    distinct: dict[str, dict[str, Event]] = {}
    for event in events:
        distinct.setdefault(event.user_session, {}).setdefault(event.event_id, event)
    return {s: SessionState.of(by_id.values()).to_hash() for s, by_id in distinct.items()}


def stored_hashes(client: redis.Redis, sessions: list[str]) -> dict[str, dict[str, str]]:
    return {s: client.hgetall(session_key(s)) for s in sessions}  # type: ignore[misc]


def test_chunks_in_any_order_with_replays_count_each_event_once(client: redis.Redis) -> None:
    events = own_sessions([validate_record(e) for e in generate_events(3000, days=2, seed=5)])
    rng = random.Random(5)
    shuffled = events[:]
    rng.shuffle(shuffled)
    # The same events again, as a replayed batch would bring them: some inside the chunk that
    # first carries them, some in a later chunk.
    replayed = shuffled + rng.sample(events, 400)
    rng.shuffle(replayed)
    writer = SessionFeatureWriter(client, ttl_seconds=3600)

    new = sum(writer.apply(replayed[lo : lo + 700]) for lo in range(0, len(replayed), 700))

    expected = expected_hashes(events)
    assert new == len({e.event_id for e in events})
    assert stored_hashes(client, list(expected)) == expected
    # A whole batch replayed (a restart after a crash before the Kafka commit): no change.
    assert writer.apply(events[:1000]) == 0
    assert stored_hashes(client, list(expected)) == expected
    ttl = client.ttl(applied_key(events[0].user_session))
    assert 0 < ttl <= 3600  # type: ignore[operator]


def test_a_call_mixing_applied_and_new_events_adds_only_the_new(client: redis.Redis) -> None:
    events = own_sessions([validate_record(e) for e in generate_events(800, days=1, seed=8)])
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    first, second = events[::2], events[1::2]
    assert writer.apply(first) == len(first)
    # Every session of `second` that also had events in `first` now mixes both kinds.
    assert writer.apply(first + second) == len(second)
    expected = expected_hashes(events)
    assert stored_hashes(client, list(expected)) == expected


def test_awkward_event_ids_stay_distinct(client: redis.Redis) -> None:
    base = validate_record(next(iter(generate_events(1, days=1, seed=3))))
    session = f"{uuid.uuid4().hex[:8]}-awkward"
    start = datetime(2024, 5, 1, 12, tzinfo=UTC)
    ids = [
        "plain",
        "with space",
        "with  two spaces ",
        "#plain",
        applied_token("with space"),  # the token of another id, taken as an id of its own
        "ünïcödé id",
        "tab\there",
        "",  # never from validate_record (it derives an id), but a direct caller may send it
    ]
    events = [
        replace(base, event_id=i, user_session=session, event_time=start + timedelta(seconds=n))
        for n, i in enumerate(ids)
    ]
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    assert writer.apply(events) == len(ids)
    assert writer.apply(events[::-1]) == 0
    assert stored_hashes(client, [session]) == expected_hashes(events)
    assert client.scard(applied_key(session)) == len(ids)


def test_a_session_with_more_events_than_one_entry_holds(client: redis.Redis) -> None:
    base = validate_record(next(iter(generate_events(1, days=1, seed=4))))
    session = f"{uuid.uuid4().hex[:8]}-long"
    start = datetime(2024, 5, 1, tzinfo=UTC)
    events = [
        replace(
            base,
            event_id=f"long-{n}",
            user_session=session,
            event_type="view",
            product_id=n % 37,
            event_time=start + timedelta(seconds=n),
        )
        for n in range(2 * IDS_PER_ENTRY + 17)
    ]
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    assert writer.apply(events) == len(events)
    assert stored_hashes(client, [session]) == expected_hashes(events)


def test_an_emptied_script_cache_is_refilled(client: redis.Redis) -> None:
    events = own_sessions([validate_record(e) for e in generate_events(200, days=1, seed=9)])
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    assert writer.apply(events[:100]) == 100
    client.script_flush()  # what a Redis restart does
    assert writer.apply(events) == 100
    expected = expected_hashes(events)
    assert stored_hashes(client, list(expected)) == expected
