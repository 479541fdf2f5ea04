"""The event schema and its validation rules: the one definition that producers, the validator,
the Flink job and the lake all import.

Policy, documented here because every consumer depends on it:
- Raw events are JSON objects. Numeric fields accept JSON numbers or decimal strings (the public
  dataset is CSV, so a replay carries text); anything else is `wrong_type`.
- `event_time` accepts the dataset's CSV form `2019-10-01 00:00:00 UTC` and ISO-8601 with an
  offset or `Z`; a naive ISO time is taken as UTC.
- Empty `category_code` / `brand` mean null.
- `event_id` is optional; when absent it is derived from the other fields, so a replayed duplicate
  row gets the same id and is removed by deduplication downstream.
- Unknown extra fields are ignored (dropped from the validated record) so producers can evolve
  ahead of consumers; a field only becomes part of the contract when it is added here (and to
  the generated JSON Schema / Avro files, which allow additional properties for that reason).
- Integers (int64) and prices are strict: ASCII decimal digits only in strings (no `1_000`, no
  other scripts' digits), booleans are not numbers, prices are finite and non-negative.
- `event_time` must lie in [MIN_EVENT_TIME, now + MAX_FUTURE].
- Strings longer than MAX_STRING_LENGTH characters and messages over MAX_MESSAGE_BYTES bytes are
  rejected; so are strings that cannot be encoded as UTF-8 (lone surrogates from `\ud800`).
- Duplicate JSON keys: the last one wins (Python's json, like most parsers).

Every rejection has a stable `error_type` (ERROR_TYPES). `route` turns one raw message into the
record to produce (validated event or dead letter); it never raises, so a validator built on it
cannot be crashed by its input: an unexpected failure in a rule becomes `internal_error`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import orjson

EVENT_TYPES: tuple[str, ...] = ("view", "cart", "remove_from_cart", "purchase")
REQUIRED_FIELDS: tuple[str, ...] = (
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "price",
    "user_id",
    "user_session",
)
OPTIONAL_FIELDS: tuple[str, ...] = ("category_code", "brand", "event_id")
# Dead letters are compact, ASCII-only JSON.
_DEAD_LETTER_JSON = json.JSONEncoder(separators=(",", ":"))
# Column order of a validated event everywhere (lake, warehouse, JSON Schema).
FIELD_ORDER: tuple[str, ...] = (
    "event_id",
    "event_time",
    "event_type",
    "product_id",
    "category_id",
    "category_code",
    "brand",
    "price",
    "user_id",
    "user_session",
)

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_STRING_LENGTH = 256
MAX_MESSAGE_BYTES = 64 * 1024
MAX_FUTURE = timedelta(days=1)
# Older than the first e-commerce datasets we replay by decades: a year-1 or epoch-0 timestamp
# is a producer bug, not history.
MIN_EVENT_TIME = datetime(2000, 1, 1, tzinfo=UTC)

# Every error_type a rejection can carry, with what it means (also in the README).
ERROR_TYPES: dict[str, str] = {
    "missing_payload": "the Kafka message has no value (tombstone)",
    "message_too_large": f"the message is over {MAX_MESSAGE_BYTES} bytes",
    "not_utf8": "the bytes are not UTF-8",
    "malformed_json": "the text is not JSON (or nests too deep)",
    "wrong_type": "the event is not an object, or a field has the wrong JSON type or format",
    # An empty string in another required field breaks that field's own rule (an empty
    # event_type is unknown_event_type, an empty id wrong_type, an empty time bad_timestamp).
    "missing_field": "a required field is absent or null, or user_session is blank",
    "int_out_of_range": "an integer field does not fit in int64",
    "bad_price": "the price is negative, NaN or infinite",
    "unknown_event_type": f"event_type is not one of {', '.join(EVENT_TYPES)}",
    "bad_timestamp": "event_time does not parse as a timestamp",
    "timestamp_in_future": f"event_time is more than {MAX_FUTURE} after the validator's clock",
    "timestamp_too_old": f"event_time is before {MIN_EVENT_TIME:%Y-%m-%d}",
    "string_too_long": f"a string field is over {MAX_STRING_LENGTH} characters",
    "invalid_string": "a string field holds a lone surrogate (not encodable as UTF-8)",
    "internal_error": "a rule failed unexpectedly; the event is kept here, never dropped",
}

# An int64 in decimal text: the form producers should send (the generated JSON Schema uses it).
_INT_TEXT = re.compile(r"-?[0-9]{1,19}", re.ASCII)
# What the validator accepts as integer text: any ASCII digits, so zero padding is fine; the
# value decides whether it fits.
_ANY_INT_TEXT = re.compile(r"-?[0-9]+", re.ASCII)
# Whitespace around numbers in strings is tolerated; only ASCII whitespace (not e.g. U+3000).
_ASCII_SPACE = " \t\r\n"
# Decimal text, plus the spellings of NaN/infinity so that those are reported as bad_price.
_DECIMAL_TEXT = re.compile(
    r"[+-]?(([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?|nan|inf|infinity)",
    re.ASCII | re.IGNORECASE,
)


# Not frozen: a frozen dataclass sets each field through object.__setattr__, which made building
# the Event a tenth of the validator's time. Treat it as immutable all the same.
@dataclass(slots=True)
class Event:
    """A validated event; `event_time` is timezone-aware UTC."""

    event_id: str
    event_time: datetime
    event_type: str
    product_id: int
    category_id: int
    category_code: str | None
    brand: str | None
    price: float
    user_id: int
    user_session: str

    def to_json_dict(self) -> dict[str, Any]:
        # Spelled out: dataclasses.asdict deep-copies every value and cost half the
        # validator's time per event.
        return self._json_dict(format_time(self.event_time))

    def _json_dict(self, event_time: str | datetime) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "event_time": event_time,
            "event_type": self.event_type,
            "product_id": self.product_id,
            "category_id": self.category_id,
            "category_code": self.category_code,
            "brand": self.brand,
            "price": self.price,
            "user_id": self.user_id,
            "user_session": self.user_session,
        }

    def to_json_bytes(self) -> bytes:
        # Compact UTF-8 JSON (non-ASCII characters as they are, not \u escapes).
        ts = self.event_time
        if ts.microsecond and ts.tzinfo is UTC:
            # The usual case: orjson prints this time exactly as format_time does, in the same
            # call as the rest of the event.
            return orjson.dumps(self._json_dict(ts), option=orjson.OPT_UTC_Z)
        return orjson.dumps(self._json_dict(format_time(ts)))


class ValidationError(ValueError):
    """A rule an event broke: `error_type` is a stable machine-readable code."""

    def __init__(self, error_type: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.field = field


def format_time(ts: datetime) -> str:
    """`2019-10-01T00:00:00.000000Z`: always microseconds, always Z (isoformat is faster than
    strftime; years before 1000, which would print differently, are rejected as too old)."""
    if ts.microsecond and ts.tzinfo is UTC:
        # The usual case, in a fifth of the time: orjson prints an aware UTC time the same way,
        # except that it leaves out a zero microsecond part.
        return orjson.dumps(ts, option=orjson.OPT_UTC_Z)[1:-1].decode()
    return ts.astimezone(UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def parse_time(value: Any, field: str = "event_time") -> datetime:
    if not isinstance(value, str):
        raise ValidationError("wrong_type", f"{field} must be a string timestamp", field)
    text = value.strip()
    try:
        if text.endswith(" UTC"):  # the public dataset's CSV form
            ts = datetime.strptime(text[:-4], "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
        else:
            ts = datetime.fromisoformat(text.replace("Z", "+00:00"))
            if ts.tzinfo is None:
                ts = ts.replace(tzinfo=UTC)
            elif ts.tzinfo is not UTC:  # "Z" and "+00:00" give UTC itself: nothing to convert
                ts = ts.astimezone(UTC)
    except (ValueError, OverflowError):
        # OverflowError: a valid ISO time whose offset pushes it past year 1 or 9999.
        raise ValidationError(
            "bad_timestamp", f"{field} {text[:40]!r} is not a timestamp", field
        ) from None
    return ts


def _int64(record: dict[str, Any], field: str) -> int:
    value = record[field]
    if isinstance(value, bool):
        raise ValidationError("wrong_type", f"{field} must be an integer, got a boolean", field)
    if isinstance(value, str):
        text = value.strip(_ASCII_SPACE)
        if not _ANY_INT_TEXT.fullmatch(text):
            raise ValidationError(
                "wrong_type", f"{field} must be an integer, got {text[:40]!r}", field
            )
        # Checked on the significant digits before int(): Python refuses to parse strings of
        # over 4300 digits, and a 20-digit zero-padded string can still be a small number.
        if len(text.lstrip("-").lstrip("0")) > 19:
            raise ValidationError(
                "int_out_of_range", f"{field} {text[:40]} does not fit in int64", field
            )
        value = int(text)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValidationError(
                "int_out_of_range", f"{field} {value} does not fit in int64", field
            )
        if not value.is_integer():
            raise ValidationError("wrong_type", f"{field} must be an integer, got {value}", field)
        if not -(2.0**63) < value < 2.0**63:
            # Out of range, or at -2**63 where a float is only an approximation: orjson turns
            # an integer literal beyond 64 bits into the nearest float, and -2**63 - 1 lands
            # exactly on -2**63.
            raise ValidationError(
                "int_out_of_range", f"{field} {value} does not fit in int64", field
            )
        value = int(value)
    elif not isinstance(value, int):
        raise ValidationError(
            "wrong_type", f"{field} must be an integer, got {type(value).__name__}", field
        )
    if not INT64_MIN <= value <= INT64_MAX:
        # Not f"{value}": formatting an int of over 4300 digits raises ValueError.
        shown = str(value) if value.bit_length() <= 256 else f"of {value.bit_length()} bits"
        raise ValidationError("int_out_of_range", f"{field} {shown} does not fit in int64", field)
    return value


def _price(record: dict[str, Any]) -> float:
    value = record["price"]
    if isinstance(value, bool):
        raise ValidationError("wrong_type", "price must be a number, got a boolean", "price")
    if isinstance(value, str):
        text = value.strip(_ASCII_SPACE)
        if not _DECIMAL_TEXT.fullmatch(text):
            raise ValidationError(
                "wrong_type", f"price must be a decimal number, got {text[:40]!r}", "price"
            )
        value = float(text)  # may be inf ("1e999"): rejected as non-finite below
    elif isinstance(value, int):
        try:
            value = float(value)
        except OverflowError:
            raise ValidationError(
                "bad_price",
                f"price must be finite, got a {value.bit_length()}-bit integer",
                "price",
            ) from None
    elif not isinstance(value, float):
        raise ValidationError(
            "wrong_type", f"price must be a number, got {type(value).__name__}", "price"
        )
    if not math.isfinite(value):
        raise ValidationError("bad_price", f"price must be finite, got {value}", "price")
    if value < 0:
        raise ValidationError("bad_price", f"price must be >= 0, got {value}", "price")
    return value


def _string(record: dict[str, Any], field: str, *, nullable: bool) -> str | None:
    value = record.get(field)
    if value is None or (nullable and value == ""):
        if nullable:
            return None
        raise ValidationError("missing_field", f"{field} is required", field)
    if not isinstance(value, str):
        raise ValidationError(
            "wrong_type", f"{field} must be a string, got {type(value).__name__}", field
        )
    if len(value) > MAX_STRING_LENGTH:
        raise ValidationError(
            "string_too_long", f"{field} is {len(value)} chars, limit {MAX_STRING_LENGTH}", field
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValidationError(
            "invalid_string", f"{field} holds a lone surrogate, not encodable as UTF-8", field
        ) from None
    if not nullable and not value.strip():
        raise ValidationError("missing_field", f"{field} is empty", field)
    return value


def _plain_string(value: Any) -> bool:
    """A str that passes every string rule as it is (ASCII always encodes as UTF-8)."""
    return type(value) is str and len(value) <= MAX_STRING_LENGTH and value.isascii()


def derive_event_id(
    event_time: datetime,
    event_type: str,
    product_id: int,
    user_id: int,
    user_session: str,
    price: float,
) -> str:
    key = f"{format_time(event_time)}|{event_type}|{product_id}|{user_id}|{user_session}|{price!r}"
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def validate_record(record: Any, *, now: datetime | None = None) -> Event:
    """Apply every rule to a decoded JSON value; raise `ValidationError` on the first broken one."""
    if not isinstance(record, dict):
        raise ValidationError(
            "wrong_type", f"event must be a JSON object, got {type(record).__name__}"
        )
    get: Callable[[str], Any] = record.get
    event_time, event_type = get("event_time"), get("event_type")
    product_id, category_id, price = get("product_id"), get("category_id"), get("price")
    user_id, user_session = get("user_id"), get("user_session")
    if (  # REQUIRED_FIELDS, spelled out for speed; the loop names the first one missing
        event_time is None
        or event_type is None
        or product_id is None
        or category_id is None
        or price is None
        or user_id is None
        or user_session is None
    ):
        for field in REQUIRED_FIELDS:
            if get(field) is None:
                raise ValidationError("missing_field", f"{field} is required", field)
    if not isinstance(event_type, str):
        raise ValidationError("wrong_type", "event_type must be a string", "event_type")
    if event_type not in EVENT_TYPES:
        raise ValidationError(
            "unknown_event_type",
            f"event_type {event_type[:40]!r} is not one of {', '.join(EVENT_TYPES)}",
            "event_type",
        )
    event_time = parse_time(event_time)
    if event_time > (now or datetime.now(UTC)) + MAX_FUTURE:
        raise ValidationError(
            "timestamp_in_future",
            f"event_time {format_time(event_time)} is in the future",
            "event_time",
        )
    if event_time < MIN_EVENT_TIME:
        raise ValidationError(
            "timestamp_too_old",
            f"event_time {format_time(event_time)} is before {MIN_EVENT_TIME:%Y-%m-%d}",
            "event_time",
        )
    # Each field first gets a quick look for the form producers send (a plain int in range, a
    # finite non-negative float, a short ASCII string): that value passes its rule unchanged.
    # Anything else goes through the rule, which decides the value or the error. Checked in
    # the rules' order, so the first broken rule is still the one reported.
    if type(product_id) is not int or not INT64_MIN <= product_id <= INT64_MAX:
        product_id = _int64(record, "product_id")
    if type(category_id) is not int or not INT64_MIN <= category_id <= INT64_MAX:
        category_id = _int64(record, "category_id")
    if type(user_id) is not int or not INT64_MIN <= user_id <= INT64_MAX:
        user_id = _int64(record, "user_id")
    if type(price) is not float or not 0.0 <= price < math.inf:  # NaN fails both comparisons
        price = _price(record)
    if not (_plain_string(user_session) and user_session.strip()):
        user_session = _string(record, "user_session", nullable=False)
        assert user_session is not None
    category_code = get("category_code")
    if category_code is not None and not _plain_string(category_code):
        category_code = _string(record, "category_code", nullable=True)
    brand = get("brand")
    if brand is not None and not _plain_string(brand):
        brand = _string(record, "brand", nullable=True)
    event_id = get("event_id")
    if event_id is not None and not _plain_string(event_id):
        event_id = _string(record, "event_id", nullable=True)
    # An empty optional string means null, as in _string.
    category_code, brand = category_code or None, brand or None
    event_id = event_id or derive_event_id(
        event_time, event_type, product_id, user_id, user_session, price
    )
    return Event(  # positional (faster), in the field order
        event_id,
        event_time,
        event_type,
        product_id,
        category_id,
        category_code,
        brand,
        price,
        user_id,
        user_session,
    )


def validate_bytes(payload: bytes | None, *, now: datetime | None = None) -> Event:
    """Decode and validate one Kafka message value."""
    if payload is None:
        raise ValidationError("missing_payload", "message has no value")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValidationError(
            "message_too_large", f"message is {len(payload)} bytes, limit {MAX_MESSAGE_BYTES}"
        )
    try:
        # orjson is 4x faster than json and agrees with it on every input it accepts (it also
        # checks UTF-8); what it refuses (bad UTF-8, NaN literals, lone surrogates, numbers out
        # of range, deep nesting) goes through json, which decides the exact error_type.
        return validate_record(orjson.loads(payload), now=now)
    except orjson.JSONDecodeError:
        pass
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValidationError("not_utf8", f"payload is not UTF-8: {exc.reason}") from None
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(
            "malformed_json", f"payload is not JSON: {exc.msg} at {exc.pos}"
        ) from None
    except RecursionError:
        raise ValidationError("malformed_json", "payload nests too deep to parse") from None
    except ValueError as exc:  # e.g. an integer literal over Python's 4300-digit limit
        raise ValidationError("malformed_json", f"payload is not parsable JSON: {exc}") from None
    return validate_record(record, now=now)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """The dead-letter envelope written to `events.invalid` (DESIGN.md section 5)."""

    payload: str  # the original bytes; only the first MAX_MESSAGE_BYTES when truncated
    payload_encoding: str  # "utf-8" or "base64"
    payload_bytes: int  # size of the original message
    # True for an oversized message: the envelope must fit the broker's message limit, so it
    # keeps the first MAX_MESSAGE_BYTES; the whole message stays at source_topic/partition/offset.
    payload_truncated: bool
    error_type: str
    error_message: str
    error_field: str | None
    source_topic: str
    source_partition: int
    source_offset: int
    received_at: str

    @classmethod
    def build(
        cls,
        payload: bytes | None,
        error: ValidationError,
        *,
        topic: str,
        partition: int,
        offset: int,
        received_at: datetime | None = None,
    ) -> DeadLetter:
        raw = payload or b""
        kept = raw[:MAX_MESSAGE_BYTES]
        try:
            text, encoding = kept.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = base64.b64encode(kept).decode("ascii"), "base64"
        return cls(
            payload=text,
            payload_encoding=encoding,
            payload_bytes=len(raw),
            payload_truncated=len(kept) < len(raw),
            error_type=error.error_type,
            error_message=str(error),
            error_field=error.field,
            source_topic=topic,
            source_partition=partition,
            source_offset=offset,
            received_at=format_time(received_at or datetime.now(UTC)),
        )

    def original_bytes(self) -> bytes:
        if self.payload_encoding == "base64":
            return base64.b64decode(self.payload)
        return self.payload.encode("utf-8")

    def to_json_bytes(self) -> bytes:
        # json (not orjson) for its ASCII-only output; the fields spelled out because asdict
        # deep-copies them (a dead letter cost twenty valid events).
        return _DEAD_LETTER_JSON.encode(
            {
                "payload": self.payload,
                "payload_encoding": self.payload_encoding,
                "payload_bytes": self.payload_bytes,
                "payload_truncated": self.payload_truncated,
                "error_type": self.error_type,
                "error_message": self.error_message,
                "error_field": self.error_field,
                "source_topic": self.source_topic,
                "source_partition": self.source_partition,
                "source_offset": self.source_offset,
                "received_at": self.received_at,
            }
        ).encode()


@dataclass(slots=True)  # not frozen, for speed (see Event)
class Routed:
    """Where one raw message goes: a validated event, or a dead letter for `events.invalid`."""

    destination: Literal["valid", "invalid"]
    key: bytes | None
    value: bytes
    event: Event | None = None
    error_type: str | None = None


def route(
    payload: bytes | None,
    *,
    key: bytes | None,
    topic: str,
    partition: int,
    offset: int,
    received_at: datetime,
    now: datetime | None = None,
) -> Routed:
    """Validate one raw message and build what to produce; never raises.

    The local runner (easymlops.validate) and the Flink job (flink_jobs/) both call this, so
    they cannot disagree. Valid events are keyed by session (one session stays ordered in one
    partition); dead letters keep the original key.
    """
    try:
        event = validate_bytes(payload, now=now or received_at)
        return Routed("valid", event.user_session.encode(), event.to_json_bytes(), event=event)
    except ValidationError as exc:
        error = exc
    except Exception as exc:  # a bug in a rule must not stop the stream or lose the event
        error = ValidationError("internal_error", f"{type(exc).__name__}: {exc}"[:500])
    letter = DeadLetter.build(
        payload, error, topic=topic, partition=partition, offset=offset, received_at=received_at
    )
    return Routed("invalid", key, letter.to_json_bytes(), error_type=error.error_type)
