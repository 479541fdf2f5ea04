"""The validation rules, one case per error type (pure: no services)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from easymlops.schema import DeadLetter, ValidationError, validate_bytes, validate_record

NOW = datetime(2026, 1, 1, tzinfo=UTC)
GOOD = {
    "event_time": "2019-10-01 00:00:00 UTC",
    "event_type": "cart",
    "product_id": "44600062",
    "category_id": 2103807459595387724,
    "category_code": "",
    "brand": "shiseido",
    "price": "35.79",
    "user_id": 541312140,
    "user_session": "72d76fde-8bb3-4e00-8c23-a032dfed738c",
}


def test_csv_form_is_typed_and_empty_strings_are_null() -> None:
    event = validate_record(GOOD, now=NOW)
    assert event.event_time == datetime(2019, 10, 1, tzinfo=UTC)
    assert event.product_id == 44600062
    assert event.price == pytest.approx(35.79)
    assert event.category_code is None
    assert event.brand == "shiseido"
    assert len(event.event_id) == 32


def test_event_id_is_deterministic_and_kept_when_given() -> None:
    assert validate_record(GOOD, now=NOW).event_id == validate_record(dict(GOOD), now=NOW).event_id
    assert validate_record({**GOOD, "event_id": "abc"}, now=NOW).event_id == "abc"


def test_iso_timestamps_are_normalized_to_utc() -> None:
    event = validate_record({**GOOD, "event_time": "2019-10-01T02:00:00+02:00"}, now=NOW)
    assert event.event_time == datetime(2019, 10, 1, tzinfo=UTC)


def test_validated_json_round_trips() -> None:
    event = validate_record(GOOD, now=NOW)
    again = validate_bytes(event.to_json_bytes(), now=NOW)
    assert again == event


@pytest.mark.parametrize(
    ("change", "error_type", "field"),
    [
        ({"user_id": None}, "missing_field", "user_id"),
        ({"user_session": "  "}, "missing_field", "user_session"),
        ({"product_id": "abc"}, "wrong_type", "product_id"),
        ({"product_id": 1.5}, "wrong_type", "product_id"),
        ({"user_id": True}, "wrong_type", "user_id"),
        ({"user_id": 2**63}, "int_out_of_range", "user_id"),
        ({"price": -1}, "bad_price", "price"),
        ({"price": "nan"}, "bad_price", "price"),
        ({"price": "cheap"}, "wrong_type", "price"),
        ({"event_type": "click"}, "unknown_event_type", "event_type"),
        ({"event_time": "yesterday"}, "bad_timestamp", "event_time"),
        ({"event_time": "2030-01-01 00:00:00 UTC"}, "timestamp_in_future", "event_time"),
        ({"brand": "x" * 300}, "string_too_long", "brand"),
        ({"brand": 7}, "wrong_type", "brand"),
    ],
)
def test_each_rule_names_its_error_and_field(change: dict, error_type: str, field: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_record({**GOOD, **change}, now=NOW)
    assert caught.value.error_type == error_type
    assert caught.value.field == field


@pytest.mark.parametrize(
    ("payload", "error_type"),
    [
        (b'{"event_type": "view"', "malformed_json"),
        (b"\xff\xfe\x00binary", "not_utf8"),
        (b"[1, 2]", "wrong_type"),
        (None, "missing_payload"),
        (json.dumps({**GOOD, "brand": "x" * 70_000}).encode(), "message_too_large"),
    ],
)
def test_payload_level_rules(payload: bytes | None, error_type: str) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_bytes(payload, now=NOW)
    assert caught.value.error_type == error_type


def test_dead_letter_keeps_non_utf8_bytes_as_base64() -> None:
    raw = b"\xff\xfe\x00binary"
    letter = DeadLetter.build(
        raw, ValidationError("not_utf8", "bad"), topic="events.raw", partition=2, offset=9
    )
    assert letter.payload_encoding == "base64"
    assert letter.original_bytes() == raw
    envelope = json.loads(letter.to_json_bytes())
    assert envelope["source_topic"] == "events.raw"
    assert (envelope["source_partition"], envelope["source_offset"]) == (2, 9)
    assert envelope["error_type"] == "not_utf8"
    assert envelope["received_at"].endswith("Z")
