"""The session-feature writer on the real Redis: whatever order, chunking and replays the stream
delivers, each session's hash holds exactly one field per distinct event (`session_fields`, what
the Flink job writes too), expiring from the last write, and `apply` reports only the events that
were new."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
import redis
from easymlops_native import pack_session_writes

from easymlops.features import session_key
from easymlops.generator import generate_events
from easymlops.schema import Event, validate_record
from easymlops.session_features import (
    EVENT_PREFIX,
    EVENTS_PER_CALL,
    STORE_EVENTS_LUA,
    SessionFeatureWriter,
    event_field,
    features_at,
    session_fields,
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
    return {s: session_fields(by_id.values()) for s, by_id in distinct.items()}


def stored_hashes(client: redis.Redis, sessions: list[str]) -> dict[str, dict[str, str]]:
    return {s: client.hgetall(session_key(s)) for s in sessions}  # type: ignore[misc]


def test_chunks_in_any_order_with_replays_store_each_event_once(client: redis.Redis) -> None:
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
    # A whole batch replayed in shuffled chunks (a restart after a crash before the Kafka
    # commit): nothing new, nothing changed.
    again = events[:1000]
    rng.shuffle(again)
    assert sum(writer.apply(again[lo : lo + 300]) for lo in range(0, len(again), 300)) == 0
    assert stored_hashes(client, list(expected)) == expected
    for session in list(expected)[:20]:
        ttl = client.ttl(session_key(session))
        assert 3500 < ttl <= 3600  # type: ignore[operator]


def test_the_ttl_counts_from_the_last_write(client: redis.Redis) -> None:
    [first, second] = own_sessions(
        [validate_record(e) for e in generate_events(2, days=1, seed=12)]
    )
    second = replace(second, user_session=first.user_session)
    key = session_key(first.user_session)
    writer = SessionFeatureWriter(client, ttl_seconds=3)
    writer.apply([first])
    time.sleep(1.5)
    writer.apply([second])
    assert client.pttl(key) > 2500  # type: ignore[operator]
    time.sleep(2)  # past the first write's expiry, not the second's
    assert client.hlen(key) == 2  # type: ignore[comparison-overlap]
    assert writer.apply([]) == 0


def test_awkward_event_ids_stay_distinct(client: redis.Redis) -> None:
    base = validate_record(next(iter(generate_events(1, days=1, seed=3))))
    session = f"{uuid.uuid4().hex[:8]}-awkward session #1 | ü"
    start = datetime(2024, 5, 1, 12, tzinfo=UTC)
    ids = [
        "plain",
        "with space",
        "with  two spaces ",
        "#plain",
        "#",
        "a|b|c",
        "1|1|1",
        "e:nested",
        "ünïcödé id ✓ 日本",
        "tab\there",
        "new\nline",
        "x" * 256,
        "",  # never from validate_record (it derives an id), but a direct caller may send it
    ]
    events = [
        replace(base, event_id=i, user_session=session, event_time=start + timedelta(seconds=n))
        for n, i in enumerate(ids)
    ]
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    assert writer.apply(events) == len(ids)
    assert writer.apply(events[::-1]) == 0
    stored: dict[str, str] = client.hgetall(session_key(session))  # type: ignore[assignment]
    assert stored == session_fields(events)
    assert sorted(stored) == sorted(EVENT_PREFIX + i for i in ids)
    # Every event is read back as itself: a cart after all of them counts them all, and one
    # given the id of an event leaves exactly that one out.
    after = start + timedelta(hours=1)
    assert features_at(stored, base.product_id, after)["session_events"] == len(ids)
    for eid in ids:
        assert features_at(stored, base.product_id, after, eid)["session_events"] == len(ids) - 1


def test_a_session_with_thousands_of_events(client: redis.Redis) -> None:
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
        for n in range(2517)
    ]
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    assert writer.apply(events) == len(events)
    assert writer.apply(events[100:1200]) == 0
    stored: dict[str, str] = client.hgetall(session_key(session))  # type: ignore[assignment]
    assert stored == session_fields(events)
    cart_at = start + timedelta(seconds=2000)  # after views 0..1999, at view 2000's instant
    features = features_at(stored, 5, cart_at)
    assert features["session_views"] == 2001  # the view at the cart's instant comes first
    assert features["session_distinct_products"] == 37
    assert features["session_product_views"] == len([n for n in range(2001) if n % 37 == 5])
    assert features["session_seconds"] == 2000.0


def test_a_repeated_event_id_is_one_field(client: redis.Redis) -> None:
    [event] = own_sessions([validate_record(e) for e in generate_events(1, days=1, seed=6)])
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    assert writer.apply([event, event, event]) == 1
    assert client.hgetall(session_key(event.user_session)) == dict([event_field(event)])


def test_an_outage_raises_for_the_caller_to_retry() -> None:
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    [event] = [validate_record(e) for e in generate_events(1, days=1, seed=7)]
    with pytest.raises(redis.ConnectionError):
        SessionFeatureWriter(dead, ttl_seconds=3600).apply([event])


def test_an_emptied_script_cache_needs_nothing(client: redis.Redis) -> None:
    """What a Redis restart does to scripts: the writer sends its script whole, so it goes on."""
    events = own_sessions([validate_record(e) for e in generate_events(200, days=1, seed=9)])
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    assert writer.apply(events[:100]) == 100
    client.script_flush()
    assert writer.apply(events) == 100
    expected = expected_hashes(events)
    assert stored_hashes(client, list(expected)) == expected


def packed(writer: SessionFeatureWriter, events: list[Event]) -> int:
    """What the validator does: the same commands, packed by its compiled fast path."""
    fields = [(e.user_session, *event_field(e)) for e in events]
    return writer.send_packed(
        pack_session_writes(
            fields, session_key(""), writer.ttl_seconds, STORE_EVENTS_LUA, EVENTS_PER_CALL
        )
    )


def test_packed_commands_store_what_apply_stores(client: redis.Redis) -> None:
    """Sessions of every size (one over several script calls), non-ASCII names and ids, and
    replays: the packed path stores the same hashes and reports the same counts."""
    events = [validate_record(e) for e in generate_events(3000, days=2, seed=13)]
    start = datetime(2024, 5, 1, tzinfo=UTC)
    long_session = [
        replace(events[0], event_id=f"lång-{n}", event_time=start + timedelta(seconds=n))
        for n in range(1234)
    ]
    odd = replace(events[1], event_id="ünïcödé ✓ | e:x", user_session="sessión ü 日本")
    mixed = events + long_session + [odd]
    by_apply, by_packing = own_sessions(mixed), own_sessions(mixed)
    writer = SessionFeatureWriter(client, ttl_seconds=3600)

    assert packed(writer, by_packing) == writer.apply(by_apply) == len({e.event_id for e in mixed})
    assert packed(writer, by_packing[::-1]) == writer.apply(by_apply[::-1]) == 0
    assert packed(writer, []) == 0

    def hashes(events: list[Event], prefix: str) -> dict[str, dict[str, str]]:
        sessions = {e.user_session for e in events}
        return {s.removeprefix(prefix): client.hgetall(session_key(s)) for s in sessions}  # type: ignore[misc]

    applied = hashes(by_apply, by_apply[0].user_session.split("-")[0] + "-")
    stored = hashes(by_packing, by_packing[0].user_session.split("-")[0] + "-")
    assert stored == applied
    assert len(stored[long_session[0].user_session]) >= 1234
    assert 3500 < client.ttl(session_key(by_packing[-1].user_session)) <= 3600  # type: ignore[operator]


def test_packed_commands_raise_on_an_outage_and_leave_the_pool_usable(
    client: redis.Redis,
) -> None:
    events = own_sessions([validate_record(e) for e in generate_events(10, days=1, seed=14)])
    dead = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    with pytest.raises(redis.ConnectionError):
        packed(SessionFeatureWriter(dead, ttl_seconds=3600), events)
    # A script error answers every command; the connection is dropped, not reused half-read.
    writer = SessionFeatureWriter(client, ttl_seconds=3600)
    with pytest.raises(redis.ResponseError):
        writer.send_packed([b"*2\r\n$4\r\nEVAL\r\n$6\r\nreturn\r\n", b"*1\r\n$4\r\nPING\r\n"])
    assert packed(writer, events) == 10
