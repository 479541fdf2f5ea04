"""Property-based tests of the validation rules (hypothesis): arbitrary and adversarial input,
every encoding of a valid value, and one targeted mutation per rule on random valid events.
test_schema.py holds one hand-written example per rule; this file checks the rules hold for all
inputs a strategy can reach (pure: no services)."""

from __future__ import annotations

import contextlib
import json
import math
import re
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from easymlops.schema import (
    ERROR_TYPES,
    EVENT_TYPES,
    FIELD_ORDER,
    INT64_MAX,
    INT64_MIN,
    MAX_FUTURE,
    MAX_MESSAGE_BYTES,
    MAX_STRING_LENGTH,
    MIN_EVENT_TIME,
    REQUIRED_FIELDS,
    DeadLetter,
    Routed,
    ValidationError,
    route,
    validate_bytes,
    validate_record,
)

# The rules depend on the clock only through `now`; fixing it makes every example reproducible.
NOW = datetime(2026, 1, 1, tzinfo=UTC)
LATEST = NOW + MAX_FUTURE
ONE_MICROSECOND = timedelta(microseconds=1)
# deadline=None: a shared CI machine makes per-example timings noisy; max_examples keep the
# whole file well under a minute.
PROPERTIES = settings(max_examples=150, deadline=None)
MANY = settings(PROPERTIES, max_examples=400)

INT_FIELDS = ("product_id", "category_id", "user_id")
STRING_FIELDS = ("user_session", "category_code", "brand", "event_id")
ABSENT = object()  # marks a field left out of the record
# One valid record: for the boundary @examples, and as the base of the regression tests (a
# known case needs no search, and shrinking a drawn record would cost seconds per run).
GOOD: dict[str, Any] = {
    "event_time": "2019-10-01 00:00:00 UTC",
    "event_type": "cart",
    "product_id": "44600062",
    "category_id": 2103807459595387724,
    "price": "35.79",
    "user_id": 541312140,
    "user_session": "72d76fde-8bb3-4e00-8c23-a032dfed738c",
}

int64s = st.integers(INT64_MIN, INT64_MAX)
# JSON values of every kind, including NaN/inf and integers far beyond int64 (but under Python's
# 4300-digit limit, past which json.dumps itself fails).
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.integers(-(10**400), 10**400),
    st.floats(),
    st.text(max_size=40),
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.sampled_from(FIELD_ORDER) | st.text(max_size=12), children, max_size=8),
    ),
    max_leaves=25,
)


def naive(ts: datetime) -> datetime:
    return ts.replace(tzinfo=None)


def time_texts(ts: datetime, offset_minutes: int) -> list[str]:
    """The spellings of the instant `ts` (UTC) that the policy accepts."""
    local = naive(ts)
    texts = [local.isoformat() + "Z", local.isoformat(), local.isoformat() + "+00:00"]
    # OverflowError: the local time would fall outside years 1..9999.
    with contextlib.suppress(OverflowError):
        texts.append(ts.astimezone(timezone(timedelta(minutes=offset_minutes))).isoformat())
    if ts.microsecond == 0:  # the CSV form has whole seconds only
        texts.append(local.isoformat(sep=" ", timespec="seconds") + " UTC")
    return texts


@st.composite
def prices(draw: st.DrawFn) -> tuple[float, list[Any]]:
    """A valid price and the encodings of it: JSON numbers and decimal strings."""
    kind = draw(st.sampled_from(["float", "cents", "int"]))
    if kind == "float":
        value = abs(draw(st.floats(min_value=0, allow_nan=False, allow_infinity=False)))
        return value, [value, repr(value), f" {value!r}\t"]
    if kind == "cents":  # the dataset's "35.79"
        cents = draw(st.integers(0, 10**12))
        text = f"{cents // 100}.{cents % 100:02d}"
        return float(text), [text, float(text)]
    whole = draw(st.integers(0, 2**53))
    return float(whole), [whole, str(whole), float(whole)]


def int_encodings(value: int) -> list[Any]:
    encodings: list[Any] = [value, str(value), f" {value}\n"]
    if abs(value) <= 2**53:  # exactly representable as a JSON float
        encodings.append(float(value))
    return encodings


@st.composite
def valid_events(draw: st.DrawFn) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Two independently chosen encodings of one well-formed event, and the typed values both
    must validate to (`event_id` None: derived)."""
    event_time = draw(
        st.datetimes(naive(MIN_EVENT_TIME), naive(LATEST), timezones=st.just(UTC))
        | st.datetimes(naive(MIN_EVENT_TIME), naive(LATEST), timezones=st.just(UTC)).map(
            lambda ts: ts.replace(microsecond=0)
        )
    )
    price, price_encodings = draw(prices())
    ints = {field: draw(int64s) for field in INT_FIELDS}
    session = draw(st.text(min_size=1, max_size=MAX_STRING_LENGTH).filter(str.strip))
    optional = {
        field: draw(st.none() | st.text(min_size=1, max_size=MAX_STRING_LENGTH))
        for field in ("category_code", "brand", "event_id")
    }
    expected = {
        "event_time": event_time,
        "event_type": draw(st.sampled_from(EVENT_TYPES)),
        "price": price,
        "user_session": session,
        **ints,
        **optional,
    }
    encodings: dict[str, list[Any]] = {
        "event_time": time_texts(event_time, draw(st.integers(-14 * 60, 14 * 60))),
        "event_type": [expected["event_type"]],
        "price": price_encodings,
        "user_session": [session],
        **{field: int_encodings(value) for field, value in ints.items()},
        # Absent, null and "" all mean null.
        **{field: [value] if value else [ABSENT, None, ""] for field, value in optional.items()},
    }

    def encode() -> dict[str, Any]:
        chosen = {field: draw(st.sampled_from(options)) for field, options in encodings.items()}
        return {field: value for field, value in chosen.items() if value is not ABSENT}

    return encode(), encode(), expected


valid_records = valid_events().map(lambda case: case[0])


def rejection(record: Any) -> tuple[str, str | None]:
    """(error_type, field) of a rejected record, checked to be the same whether the record
    arrives decoded or as JSON bytes."""
    with pytest.raises(ValidationError) as direct:
        validate_record(record, now=NOW)
    with pytest.raises(ValidationError) as as_bytes:
        validate_bytes(json.dumps(record).encode(), now=NOW)
    error = (direct.value.error_type, direct.value.field)
    assert (as_bytes.value.error_type, as_bytes.value.field) == error
    assert error[0] in ERROR_TYPES
    return error


def route_now(payload: bytes | None, key: bytes | None = b"k") -> Routed:
    return route(payload, key=key, topic="events.raw", partition=0, offset=0, received_at=NOW)


# ---- 1. route never raises, whatever the bytes ------------------------------------------------
@st.composite
def mutated_events(draw: st.DrawFn) -> bytes:
    """A valid event with one field replaced or dropped, or its bytes flipped, cut or spliced."""
    record = draw(valid_records)
    operation = draw(st.sampled_from(["replace", "drop", "bytes"]))
    if operation == "replace":
        record[draw(st.sampled_from(FIELD_ORDER) | st.text(max_size=8))] = draw(json_values)
    elif operation == "drop":
        record.pop(draw(st.sampled_from(FIELD_ORDER)), None)
    data = bytearray(json.dumps(record).encode())
    if operation == "bytes":
        for _ in range(draw(st.integers(1, 4))):
            at = draw(st.integers(0, len(data)))
            edit = draw(st.sampled_from(["flip", "insert", "delete", "truncate"]))
            if edit == "flip" and at < len(data):
                data[at] ^= 1 << draw(st.integers(0, 7))
            elif edit == "insert":
                data[at:at] = draw(st.binary(min_size=1, max_size=4))
            elif edit == "delete":
                del data[at : at + draw(st.integers(1, 8))]
            else:
                del data[at:]
    return bytes(data)


# Around and over the size limit, built by repetition: hypothesis cannot draw 64 KiB directly.
huge_payloads = st.builds(
    lambda chunk, size: (chunk * (size // len(chunk) + 1))[:size],
    st.binary(min_size=1, max_size=8) | st.text(min_size=1, max_size=4).map(str.encode),
    st.integers(MAX_MESSAGE_BYTES - 4, MAX_MESSAGE_BYTES + 4)
    | st.integers(0, 4 * MAX_MESSAGE_BYTES),
)
payloads = st.one_of(
    st.none(),
    st.binary(max_size=2000),
    huge_payloads,
    json_values.map(lambda value: json.dumps(value).encode()),
    mutated_events(),
    st.integers(1, 30_000).map(lambda depth: b"[" * depth),  # nests past the recursion limit
    st.integers(4300, 6000).map(lambda digits: b'{"user_id": 1' + b"0" * digits + b"}"),
)


@MANY
@given(payloads, st.none() | st.binary(max_size=32))
def test_route_never_raises_and_always_produces_json(payload: bytes | None, key: bytes | None):
    routed = route_now(payload, key)
    assert routed.destination in ("valid", "invalid")
    json.loads(routed.value)
    if routed.destination == "valid":
        assert routed.event is not None
        assert routed.value == routed.event.to_json_bytes()
    else:
        # internal_error is the safety net for a crashing rule: no input may reach it.
        assert routed.error_type in ERROR_TYPES
        assert routed.error_type != "internal_error"
        assert routed.key == key
    if payload is None:
        assert routed.error_type == "missing_payload"
    elif len(payload) > MAX_MESSAGE_BYTES:
        assert routed.error_type == "message_too_large"


# ---- 2. dead letters lose nothing -------------------------------------------------------------
@MANY
@given(
    payloads,
    st.text(min_size=1, max_size=40),
    st.integers(0, 2**31 - 1),
    st.integers(0, INT64_MAX),
)
@example(None, "events.raw", 0, 0)
def test_a_dead_letter_keeps_the_original_bytes_and_where_they_came_from(
    payload: bytes | None, topic: str, partition: int, offset: int
):
    routed = route(
        payload, key=None, topic=topic, partition=partition, offset=offset, received_at=NOW
    )
    assume(routed.destination == "invalid")
    letter = DeadLetter(**json.loads(routed.value))
    raw = payload or b""
    kept = raw[:MAX_MESSAGE_BYTES]
    assert letter.original_bytes() == kept
    assert letter.payload_bytes == len(raw)
    assert letter.payload_truncated == (len(raw) > MAX_MESSAGE_BYTES)
    try:
        kept.decode("utf-8")
        is_text = True
    except UnicodeDecodeError:
        is_text = False
    assert letter.payload_encoding == ("utf-8" if is_text else "base64")
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        topic,
        partition,
        offset,
    )
    assert letter.error_type == routed.error_type
    assert letter.error_type in ERROR_TYPES
    assert letter.received_at == "2026-01-01T00:00:00.000000Z"


# ---- 3. valid events round-trip ---------------------------------------------------------------
@MANY
@given(valid_events())
def test_every_encoding_of_a_valid_event_validates_to_the_same_event(
    case: tuple[dict[str, Any], dict[str, Any], dict[str, Any]],
):
    record, other_encoding, expected = case
    event = validate_record(record, now=NOW)
    for field, value in expected.items():
        if field != "event_id":
            assert getattr(event, field) == value, field
    if expected["event_id"]:
        assert event.event_id == expected["event_id"]
    else:
        assert re.fullmatch(r"[0-9a-f]{32}", event.event_id)
    # Same values, other encoding: same event, so a replayed duplicate gets the same event_id.
    assert validate_record(other_encoding, now=NOW) == event
    # Idempotence: the validated output is itself valid and means the same event.
    output = event.to_json_bytes()
    assert validate_bytes(output, now=NOW) == event
    assert validate_bytes(output, now=NOW).to_json_bytes() == output
    assert list(json.loads(output)) == list(FIELD_ORDER)
    routed = route_now(json.dumps(record).encode())
    assert (routed.destination, routed.event, routed.value) == ("valid", event, output)
    assert routed.key == event.user_session.encode()


@PROPERTIES
@given(
    valid_records,
    st.dictionaries(st.text(max_size=20).filter(lambda k: k not in FIELD_ORDER), json_values),
)
def test_unknown_extra_fields_are_accepted_and_dropped(
    record: dict[str, Any], extra: dict[str, Any]
):
    event = validate_record({**extra, **record}, now=NOW)
    assert event == validate_record(record, now=NOW)
    assert list(json.loads(event.to_json_bytes())) == list(FIELD_ORDER)


def outcome(payload: bytes) -> Any:
    """The validated event, or (error_type, field) of the rejection."""
    try:
        return validate_bytes(payload, now=NOW)
    except ValidationError as exc:
        return exc.error_type, exc.field


@PROPERTIES
@given(valid_records, st.sampled_from(REQUIRED_FIELDS), json_values)
def test_a_duplicate_key_takes_the_last_value(record: dict[str, Any], field: str, other: Any):
    members = json.dumps(record)[1:-1]
    duplicate = f"{json.dumps(field)}: {json.dumps(other)}"
    assert outcome(f"{{{duplicate}, {members}}}".encode()) == validate_record(record, now=NOW)
    assert outcome(f"{{{members}, {duplicate}}}".encode()) == outcome(
        json.dumps({**record, field: other}).encode()
    )


# ---- 4. one mutation per rule -----------------------------------------------------------------
@PROPERTIES
@given(valid_records, st.sampled_from(REQUIRED_FIELDS), st.booleans())
def test_an_absent_or_null_required_field_is_missing_field(
    record: dict[str, Any], field: str, drop: bool
):
    if drop:
        del record[field]
    else:
        record[field] = None
    assert rejection(record) == ("missing_field", field)


blanks = st.text(alphabet=" \t\r\n\u00a0\u3000", max_size=5)


@PROPERTIES
@given(valid_records, blanks)
def test_a_blank_user_session_is_missing_field(record: dict[str, Any], blank: str):
    assert rejection({**record, "user_session": blank}) == ("missing_field", "user_session")


# Documented in ERROR_TYPES: a blank value in another required field breaks that field's rule.
BLANK_FIELD_ERRORS = {
    "event_time": "bad_timestamp",
    "event_type": "unknown_event_type",
    "product_id": "wrong_type",
    "category_id": "wrong_type",
    "price": "wrong_type",
    "user_id": "wrong_type",
}


@pytest.mark.parametrize("field", [f for f in REQUIRED_FIELDS if f != "user_session"])
@PROPERTIES
@given(blank=blanks)
def test_a_blank_required_field_breaks_its_own_rule(blank: str, field: str):
    assert rejection({**GOOD, field: blank}) == (BLANK_FIELD_ERRORS[field], field)


@PROPERTIES
@given(
    valid_records,
    st.sampled_from(FIELD_ORDER),
    st.booleans() | st.lists(int64s, max_size=3) | st.dictionaries(st.text(max_size=5), int64s),
)
def test_a_field_of_the_wrong_json_type_is_wrong_type(
    record: dict[str, Any], field: str, value: Any
):
    assert rejection({**record, field: value}) == ("wrong_type", field)


fractions = st.floats(allow_nan=False, allow_infinity=False).filter(lambda x: not x.is_integer())


@PROPERTIES
@given(valid_records, st.sampled_from(INT_FIELDS), fractions, st.booleans())
def test_an_int_field_with_a_fraction_is_wrong_type(
    record: dict[str, Any], field: str, value: float, as_text: bool
):
    assert rejection({**record, field: repr(value) if as_text else value}) == ("wrong_type", field)


beyond_int64 = st.integers(min_value=INT64_MAX + 1) | st.integers(max_value=INT64_MIN - 1)


@PROPERTIES
@given(valid_records, st.sampled_from(INT_FIELDS), beyond_int64, st.booleans())
@example(GOOD, "user_id", INT64_MAX + 1, True)
@example(GOOD, "user_id", INT64_MIN - 1, False)
def test_an_int_beyond_int64_is_int_out_of_range(
    record: dict[str, Any], field: str, value: int, as_text: bool
):
    assert rejection({**record, field: str(value) if as_text else value}) == (
        "int_out_of_range",
        field,
    )


@PROPERTIES
@given(st.sampled_from(INT_FIELDS), st.integers(4301, 5000))
def test_an_int_too_long_to_print_is_int_out_of_range(field: str, digits: int):
    with pytest.raises(ValidationError) as caught:
        validate_record({**GOOD, field: 10**digits}, now=NOW)
    assert caught.value.error_type == "int_out_of_range"


negative_prices = st.one_of(
    # Negated rather than filtered with `x < 0`, which hypothesis rewrites into bounds that
    # can let 0.0 through.
    st.floats(min_value=math.ulp(0.0), allow_nan=False, allow_infinity=False).map(lambda x: -x),
    st.integers(max_value=-1),
).flatmap(lambda value: st.sampled_from([value, repr(value)]))
non_finite_prices = st.sampled_from(
    [
        *(math.nan, math.inf, -math.inf, "nan", "NaN", "-nan", "inf", "+inf", "-Infinity", " INF "),
        *("1e999", "-1e999", 10**400, str(10**400)),  # overflow to infinity
    ]
)


@PROPERTIES
@given(valid_records, negative_prices | non_finite_prices)
def test_a_negative_or_non_finite_price_is_bad_price(record: dict[str, Any], price: Any):
    assert rejection({**record, "price": price}) == ("bad_price", "price")


@PROPERTIES
@given(
    valid_records,
    st.text(max_size=30).filter(lambda text: text not in EVENT_TYPES)
    | st.sampled_from(EVENT_TYPES).map(lambda name: f" {name.upper()}"),
)
def test_an_event_type_outside_the_list_is_unknown_event_type(
    record: dict[str, Any], event_type: str
):
    assert rejection({**record, "event_type": event_type}) == (
        "unknown_event_type",
        "event_type",
    )


@st.composite
def impossible_times(draw: st.DrawFn) -> str:
    """Well-shaped timestamps naming a month, day or hour that does not exist."""
    year = draw(st.integers(2000, 2025))
    month, day, hour = draw(st.integers(1, 12)), draw(st.integers(1, 28)), draw(st.integers(0, 23))
    broken = draw(st.sampled_from(["month", "day", "hour", "february"]))
    if broken == "month":
        month = draw(st.integers(13, 99))
    elif broken == "day":
        day = draw(st.integers(32, 99))
    elif broken == "hour":
        hour = draw(st.integers(25, 99))
    else:
        month, day = 2, draw(st.integers(30, 31))
    text = f"{year:04d}-{month:02d}-{day:02d} {hour:02d}:00:00"
    return draw(st.sampled_from([text + " UTC", text.replace(" ", "T") + "Z"]))


# Text with no decimal digit cannot name a time; blanks are left to the missing_field rule.
digitless = st.text(st.characters(exclude_categories=["Nd"]), max_size=40).filter(str.strip)


@PROPERTIES
@given(valid_records, digitless | impossible_times())
def test_an_unparsable_event_time_is_bad_timestamp(record: dict[str, Any], text: str):
    assert rejection({**record, "event_time": text}) == ("bad_timestamp", "event_time")


@PROPERTIES
@given(
    valid_records,
    st.datetimes(naive(LATEST + ONE_MICROSECOND), timezones=st.just(UTC)),
    st.integers(-14 * 60, 14 * 60),
    st.data(),
)
def test_an_event_time_past_now_plus_max_future_is_timestamp_in_future(
    record: dict[str, Any], ts: datetime, offset: int, data: st.DataObject
):
    text = data.draw(st.sampled_from(time_texts(ts, offset)))
    assert rejection({**record, "event_time": text}) == ("timestamp_in_future", "event_time")


@PROPERTIES
@given(
    valid_records,
    st.datetimes(max_value=naive(MIN_EVENT_TIME - ONE_MICROSECOND), timezones=st.just(UTC)),
    st.integers(-14 * 60, 14 * 60),
    st.data(),
)
def test_an_event_time_before_min_event_time_is_timestamp_too_old(
    record: dict[str, Any], ts: datetime, offset: int, data: st.DataObject
):
    text = data.draw(st.sampled_from(time_texts(ts, offset)))
    assert rejection({**record, "event_time": text}) == ("timestamp_too_old", "event_time")


@PROPERTIES
@given(valid_records, st.sampled_from(STRING_FIELDS), st.data())
def test_strings_are_kept_up_to_the_limit_and_rejected_past_it(
    record: dict[str, Any], field: str, data: st.DataObject
):
    longest = data.draw(
        st.text(min_size=MAX_STRING_LENGTH, max_size=MAX_STRING_LENGTH).filter(str.strip)
    )
    assert getattr(validate_record({**record, field: longest}, now=NOW), field) == longest
    too_long = longest + data.draw(st.text(min_size=1, max_size=40))
    assert rejection({**record, field: too_long}) == ("string_too_long", field)


@PROPERTIES
@given(
    valid_records,
    st.sampled_from(STRING_FIELDS),
    st.text(max_size=40),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.data(),
)
def test_a_lone_surrogate_in_a_string_is_invalid_string(
    record: dict[str, Any], field: str, text: str, surrogate: str, data: st.DataObject
):
    at = data.draw(st.integers(0, len(text)))
    value = text[:at] + surrogate + text[at:]
    assert rejection({**record, field: value}) == ("invalid_string", field)


@PROPERTIES
@given(json_values.filter(lambda value: not isinstance(value, dict)) | valid_records.map(list))
def test_a_json_value_that_is_not_an_object_is_wrong_type(value: Any):
    with pytest.raises(ValidationError) as caught:
        validate_bytes(json.dumps(value).encode(), now=NOW)
    assert caught.value.error_type == "wrong_type"


not_utf8_sequences = st.sampled_from(
    [b"\xff", b"\x80", b"\xc0\x80", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xe2\x82"]
)


@PROPERTIES
@given(valid_records, not_utf8_sequences, st.data())
def test_bytes_that_are_not_utf8_are_not_utf8(
    record: dict[str, Any], bad: bytes, data: st.DataObject
):
    payload = json.dumps(record).encode()  # ASCII: any of the sequences breaks it anywhere
    at = data.draw(st.integers(0, len(payload)))
    with pytest.raises(ValidationError) as caught:
        validate_bytes(payload[:at] + bad + payload[at:], now=NOW)
    assert caught.value.error_type == "not_utf8"


@PROPERTIES
@given(valid_records, st.integers(MAX_MESSAGE_BYTES - 4, MAX_MESSAGE_BYTES + 4))
def test_a_message_is_too_large_exactly_past_max_message_bytes(record: dict[str, Any], size: int):
    payload = json.dumps(record).encode()
    padded = payload + b" " * (size - len(payload))  # trailing whitespace is still valid JSON
    if size <= MAX_MESSAGE_BYTES:
        assert validate_bytes(padded, now=NOW) == validate_record(record, now=NOW)
    else:
        with pytest.raises(ValidationError) as caught:
            validate_bytes(padded, now=NOW)
        assert caught.value.error_type == "message_too_large"


# ---- 5. numeric strings -----------------------------------------------------------------------
@PROPERTIES
@given(valid_records, st.sampled_from(INT_FIELDS), int64s)
@example(GOOD, "user_id", INT64_MIN)
@example(GOOD, "user_id", INT64_MAX)
def test_a_decimal_string_of_an_int64_is_that_int(record: dict[str, Any], field: str, value: int):
    assert getattr(validate_record({**record, field: str(value)}, now=NOW), field) == value


@PROPERTIES
@given(st.sampled_from(INT_FIELDS), int64s, st.integers(1, 30))
def test_a_zero_padded_decimal_string_is_its_int(field: str, value: int, zeros: int):
    text = ("-" if value < 0 else "") + "0" * zeros + str(abs(value))
    assert getattr(validate_record({**GOOD, field: text}, now=NOW), field) == value


# Zeros of other scripts' decimal digits (Python's int() and float() accept all of them).
DIGIT_ZEROS = (0x0660, 0x06F0, 0x0966, 0x09E6, 0x0E50, 0xFF10, 0x1D7CE)


def other_script(text: str, zero: int) -> str:
    return "".join(chr(zero + int(c)) if c in "0123456789" else c for c in text)


@PROPERTIES
@given(valid_records, st.sampled_from(INT_FIELDS), int64s, st.sampled_from(DIGIT_ZEROS))
def test_int_digits_of_other_scripts_are_wrong_type(
    record: dict[str, Any], field: str, value: int, zero: int
):
    text = other_script(str(value), zero)
    assert int(text) == value  # Python would take it; the policy does not
    assert rejection({**record, field: text}) == ("wrong_type", field)


@PROPERTIES
@given(valid_records, prices(), st.sampled_from(DIGIT_ZEROS))
def test_price_digits_of_other_scripts_are_wrong_type(
    record: dict[str, Any], price: tuple[float, list[Any]], zero: int
):
    text = other_script(repr(price[0]), zero)
    assert float(text) == price[0]
    assert rejection({**record, "price": text}) == ("wrong_type", "price")


@PROPERTIES
@given(
    valid_records,
    st.sampled_from([*INT_FIELDS, "price"]),
    st.integers(10, INT64_MAX) | st.integers(INT64_MIN, -10),
    st.data(),
)
def test_underscores_in_numbers_are_wrong_type(
    record: dict[str, Any], field: str, value: int, data: st.DataObject
):
    digits = str(value)
    first_digit = 1 if value < 0 else 0
    at = data.draw(st.integers(first_digit + 1, len(digits) - 1))
    text = digits[:at] + "_" + digits[at:]
    assert int(text) == value  # Python would take it; the policy does not
    assert rejection({**record, field: text}) == ("wrong_type", field)
