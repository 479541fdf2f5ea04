"""The validator's compiled fast path (native/src/lib.rs) against the contract's one definition,
`easymlops.schema.route`: every message the fast path accepts must get from it exactly the
bytes `route` produces (value, key, session-feature field), and it must accept the plain form
producers send, or the validator silently falls back to the slow path.

The fast path never rejects, so the only way it can be wrong is to accept a message `route`
would reject or route differently; the generated cases below aim at those edges (numbers and
strings in every JSON spelling, escapes, duplicate keys, time forms and calendar limits, the
clock limit, nesting, truncation)."""

from __future__ import annotations

import json
import random
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson
from confluent_kafka import KafkaError, Message
from easymlops_native import route_messages, route_payload
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from easymlops.csv_replay import read_csv_events
from easymlops.generator import generate_payloads
from easymlops.schema import MAX_FUTURE, MAX_MESSAGE_BYTES, route
from easymlops.session_features import epoch_micros, event_field
from easymlops.telemetry import TRACEPARENT

NOW = datetime(2026, 12, 4, 12, 0, tzinfo=UTC)
CSV_FIXTURE = Path(__file__).parent / "fixtures" / "ecommerce_sample.csv"
LATEST = epoch_micros(NOW + MAX_FUTURE)

BASE: dict[str, Any] = {
    "event_id": "b95c44b61a3742d79f978c96b7760000",
    "event_time": "2026-12-03T16:23:52.919090Z",
    "event_type": "view",
    "product_id": 1463437,
    "category_id": 2053021822816373566,
    "category_code": "appliances.environment.water_heater",
    "brand": "head",
    "price": 169.53,
    "user_id": 510000278,
    "user_session": "b95c44b6-1a37-42d7-9f97-8c96b776eddc",
}


def same_as_route(payload: bytes, now: datetime = NOW) -> bool:
    """Whether the fast path accepted `payload`; asserts that `route` agrees on everything."""
    fast = route_payload(payload, epoch_micros(now + MAX_FUTURE))
    if fast is None:
        return False
    routed = route(payload, key=b"k", topic="raw", partition=0, offset=0, received_at=now)
    assert routed.destination == "valid", (payload, routed)
    assert routed.event is not None
    assert fast == (routed.value, routed.key, *event_field(routed.event)), payload
    return True


def test_the_generators_events_all_take_the_fast_path() -> None:
    payloads = list(generate_payloads(5000, days=3, seed=3, invalid_ratio=0.05))
    now = datetime.now(UTC)
    valid = sum(
        route(p, key=None, topic="raw", partition=0, offset=0, received_at=now).destination
        == "valid"
        for p in payloads
    )
    accepted = sum(same_as_route(p, now) for p in payloads)
    assert valid == 5000 - 250
    assert accepted == valid


def test_the_public_datasets_csv_replay_takes_the_fast_path_with_a_derived_id() -> None:
    """What `easymlops replay` sends for rows of the public dataset (numbers as text, the CSV
    time form, empty category codes, no event_id): each row the contract accepts takes the
    fast path (the fixture's rows include ones it rejects, e.g. a short row)."""
    now = datetime.now(UTC)
    payloads = list(read_csv_events(CSV_FIXTURE))
    valid = [
        p
        for p in payloads
        if route(p, key=None, topic="raw", partition=0, offset=0, received_at=now).event
    ]
    assert 0 < len(valid) < len(payloads)
    assert all(same_as_route(p, now) for p in valid)
    assert not any(
        route_payload(p, epoch_micros(now + MAX_FUTURE)) for p in payloads if p not in valid
    )


def test_the_clock_limit_is_the_same_microsecond() -> None:
    at_limit = NOW + MAX_FUTURE
    text = at_limit.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert same_as_route(orjson.dumps({**BASE, "event_time": text}))
    later = (at_limit + timedelta(microseconds=1)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    payload = orjson.dumps({**BASE, "event_time": later})
    assert route_payload(payload, LATEST) is None
    assert route(
        payload, key=None, topic="t", partition=0, offset=0, received_at=NOW
    ).error_type == ("timestamp_in_future")


def test_the_message_size_limit_is_the_same_byte() -> None:
    payload = orjson.dumps(BASE)
    padding = MAX_MESSAGE_BYTES - len(payload) - len(',"pad":""')
    at_limit = orjson.dumps({**BASE, "pad": "x" * padding})
    assert len(at_limit) == MAX_MESSAGE_BYTES
    assert same_as_route(at_limit)
    over = orjson.dumps({**BASE, "pad": "x" * (padding + 1)})
    assert route_payload(over, LATEST) is None
    assert route(over, key=None, topic="t", partition=0, offset=0, received_at=NOW).error_type == (
        "message_too_large"
    )


def test_a_batch_of_messages_gets_routes_output_and_its_bookkeeping() -> None:
    """route_messages, what the validator calls per consumed batch: per record the same output
    as `route` (or a hand-over to it), its source, its trace header; offsets and errors."""
    payloads = list(generate_payloads(300, days=1, seed=8, invalid_ratio=0.1, start=NOW.date()))
    payloads[5] = orjson.dumps({**BASE, "price": "1e2"})  # valid, but not in plain form
    messages = []
    for i, payload in enumerate(payloads):
        headers = [("other", b"x"), (TRACEPARENT, b"00-trace-%d" % (i // 100))] if i % 3 else None
        messages.append(
            Message(
                topic="raw",
                partition=i % 3,
                offset=1000 + i,
                key=b"k%d" % i,
                value=payload,
                headers=headers,
            )
        )
    messages.insert(7, Message(topic="raw", partition=1, offset=9, value=None))  # a tombstone
    eof = KafkaError(KafkaError._PARTITION_EOF)
    messages.insert(50, Message(topic="raw", partition=2, offset=1299, error=eof))
    now = datetime.now(UTC)

    batch = route_messages(messages, epoch_micros(now + MAX_FUTURE), TRACEPARENT)

    assert batch.failed == [50]
    records = [m for m in messages if m.error() is None]
    assert batch.sources == [b"%d:%d" % (m.partition(), m.offset()) for m in records]
    assert batch.next_offsets == {m.partition(): m.offset() + 1 for m in records}
    assert batch.upstream == [dict(m.headers() or {}).get(TRACEPARENT) for m in records]
    assert batch.traces == Counter(u for u in batch.upstream if u is not None)
    handed_over = {record for record, _ in batch.fallback}
    assert [messages[m] for _, m in batch.fallback] == [records[r] for r in sorted(handed_over)]
    fields = []
    for i, message in enumerate(records):
        routed = route(
            message.value(),
            key=message.key(),
            topic="raw",
            partition=message.partition(),
            offset=message.offset(),
            received_at=now,
        )
        if i in handed_over:
            assert (batch.values[i], batch.keys[i], batch.valid[i]) == (None, None, False)
            continue
        assert (batch.values[i], batch.keys[i], batch.valid[i]) == (routed.value, routed.key, True)
        assert routed.event is not None
        fields.append((routed.event.user_session, *event_field(routed.event)))
    assert batch.session_fields == fields
    assert batch.fast_valid == len(fields) == 300 - 30 - 1
    assert len(handed_over) == 30 + 1 + 1  # the invalid ones, "1e2", the tombstone


def test_no_prefix_of_an_event_is_accepted() -> None:
    payload = orjson.dumps(BASE)
    assert same_as_route(payload)
    for end in range(len(payload)):
        assert route_payload(payload[:end], LATEST) is None, payload[:end]
    assert same_as_route(b" \n\t" + payload + b"\r\n ")
    assert route_payload(payload + b"x", LATEST) is None
    assert route_payload(payload + b"{}", LATEST) is None


# JSON texts for a field's value, valid for the contract or not, plain or not.
NUMBERS = [
    "0", "-0", "7", "-7", "007", "1.0", "1.5", "1e3", "1E+2", "-1e-2", "0.0001", "0.00001",
    "9223372036854775807", "9223372036854775808", "-9223372036854775808", "-9223372036854775809",
    "99999999999999999999", "1" * 40, "123456789012345", "1234567890123456", "0.1", "169.53",
    "169.530", "1e400", "-0.0", "12345678.123456789", "00", "01", "1.", ".5", "+1", "NaN",
    "Infinity", "-Infinity",
]  # fmt: skip
TEXTS = [
    "", " ", "  x ", "a", "view", "cart", "purchase", "remove_from_cart", "VIEW", "view ",
    "\\u0076iew",
    "a\\\"b", "a\\\\b", "a\\/b", "caf\u00e9", "\\ud800", "\\ud83d\\ude00", "x" * 256, "x" * 257,
    "\u3000", "\\t", "tab\\tx", "\x7f", "123", " 123", "123 ", "-5", "1_000", "\u0661", "35.79",
    " 35.79", "1e5", "nan", "inf", "-1.5",
    "2026-12-03T16:23:52.919090Z", "2026-12-03T16:23:52Z", "2026-12-03T16:23:52.919Z",
    "2026-12-03T16:23:52.9Z", "2026-12-03T16:23:52.9190901Z", "2026-12-03T16:23:52+00:00",
    "2026-12-03T16:23:52.919090+01:00", "2026-12-03T16:23:52", "2026-12-03 16:23:52 UTC",
    "2026-12-03 16:23:52", "2026-12-03T16:23:52z", "2024-02-29T00:00:00Z", "2023-02-29T00:00:00Z",
    "2026-13-01T00:00:00Z", "2026-04-31T00:00:00Z", "2026-12-03T24:00:00Z", "2026-12-03T23:60:00Z",
    "2026-12-03T23:59:60Z", "1999-12-31T23:59:59.999999Z", "2000-01-01T00:00:00Z",
    "2126-01-01T00:00:00Z", "2026-12-05T12:00:00.000001Z", "2026-1-03T16:23:52Z",
    "2026-12-03T16:23:52.919090ZZ", "20261203T162352Z", "2026-12-03 16:23:52 UTC ",
]  # fmt: skip
RAW_VALUES = (
    NUMBERS
    + [json.dumps(t, ensure_ascii=False).replace("\\\\", "\\") for t in TEXTS]
    + ["null", "true", "false", "[]", "{}", '{"a":[1,{"b":null}]}', "[" * 40 + "]" * 40]
)


def raw_value(value: Any) -> str:
    return orjson.dumps(value).decode()


def test_every_listed_value_in_every_field_routes_the_same() -> None:
    accepted = 0
    for name in [*BASE, "extra"]:
        for value in RAW_VALUES:
            pairs = [(k, raw_value(v)) for k, v in BASE.items() if k != name] + [(name, value)]
            body = ",".join(f"{json.dumps(k)}:{v}" for k, v in pairs)
            accepted += same_as_route(("{" + body + "}").encode("utf-8", "surrogatepass"))
    # The plain forms (e.g. digit strings for ids, exact time forms, any extra field) do take
    # the fast path: a fast path that accepted nothing would pass the check above.
    assert accepted > 150


field_names = st.sampled_from([*sorted(BASE), "extra", "event_Time"])
whitespace = st.sampled_from(["", " ", "\n", "\t ", "\r\n"])


@st.composite
def near_events(draw: st.DrawFn) -> bytes:
    """A JSON object like BASE with some fields changed, dropped or repeated."""
    pairs = [(k, raw_value(v)) for k, v in BASE.items()]
    for _ in range(draw(st.integers(0, 3))):
        name = draw(field_names)
        value = draw(st.sampled_from(RAW_VALUES))
        action = draw(st.sampled_from(["set", "set", "drop", "append"]))
        if action == "drop":
            pairs = [(k, v) for k, v in pairs if k != name]
        elif action == "append" or name not in BASE:
            pairs.append((name, value))
        else:
            pairs = [(k, value if k == name else v) for k, v in pairs]
    if draw(st.booleans()):
        random.Random(draw(st.integers(0, 2**32))).shuffle(pairs)
    gap = draw(whitespace)
    body = ",".join(f"{gap}{json.dumps(k)}{gap}:{gap}{v}{gap}" for k, v in pairs)
    return ("{" + body + "}").encode("utf-8", "surrogatepass")


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(near_events())
@example(orjson.dumps({**BASE, "event_id": ""}))
@example(orjson.dumps({k: v for k, v in BASE.items() if k != "event_id"}))
@example(orjson.dumps({**BASE, "brand": None, "category_code": ""}))
def test_whatever_the_fast_path_accepts_route_routes_the_same(payload: bytes) -> None:
    same_as_route(payload)


@settings(max_examples=1000, deadline=None)
@given(
    st.sampled_from(["product_id", "category_id", "user_id", "price"]),
    st.one_of(
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.floats(min_value=0, max_value=1e16),
        st.decimals(min_value=0, max_value=10**15, places=4, allow_nan=False).map(str),
        st.integers(0, 2**64).map(str),
    ),
)
def test_numbers_of_any_size_route_the_same(name: str, value: Any) -> None:
    if isinstance(value, float) and name == "price":
        value = abs(value)
    same_as_route(json.dumps({**BASE, name: value}).encode())  # json: ints beyond 64 bits too
    # Without an event_id the price's text also goes into the derived id (Python's repr).
    same_as_route(json.dumps({**BASE, name: value, "event_id": None}).encode())


@settings(max_examples=1000, deadline=None)
@given(st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2030, 1, 1)))
def test_times_of_any_day_route_the_same(moment: datetime) -> None:
    for text in (
        moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "+00:00",
        moment.strftime("%Y-%m-%dT%H:%M:%S.%f"),
        moment.strftime("%Y-%m-%dT%H:%M:%SZ"),
        moment.strftime("%Y-%m-%dT%H:%M:%S"),
        moment.strftime("%Y-%m-%d %H:%M:%S UTC"),
    ):
        same_as_route(orjson.dumps({**BASE, "event_time": text}))


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_are_never_accepted_unless_route_agrees(payload: bytes) -> None:
    same_as_route(payload)
