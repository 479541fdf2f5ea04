"""Generate the event contracts in `easymlops/contracts/` from `easymlops.schema`, for producers
and consumers written in other languages.

    uv run python -m easymlops.schema_export           # rewrite the files
    uv run python -m easymlops.schema_export --check   # exit 1 naming each stale file

The files, all derived from schema.py (field names and order from FIELD_ORDER and the Event and
DeadLetter dataclasses, types from their annotations, required from REQUIRED_FIELDS, the enums
from EVENT_TYPES and ERROR_TYPES, bounds from MAX_STRING_LENGTH and INT64_MIN/MAX):
- `raw_event.schema.json` (JSON Schema 2020-12): what the validator accepts on `events.raw`.
  Numeric fields are JSON numbers or decimal strings (the same integer regex as the validator);
  optional fields may be absent, null or empty; extra properties are allowed (they are dropped).
- `validated_event.schema.json`: the strict output form on `events.validated`
  (`Event.to_json_dict`): int64 integers, price a number >= 0, `event_time` in the one form
  `2019-10-01T00:00:00.000000Z`, `category_code`/`brand` a non-empty string or null.
- `dead_letter.schema.json`: the envelope on `events.invalid` (`DeadLetter`).
- `validated_event.avsc`, `dead_letter.avsc` (Avro): ints are `long`, the price `double`,
  nullable fields `["null", T]` with default null. A `datetime` field (`event_time`) is a
  `timestamp-micros` long (microseconds since the epoch, UTC): the validated time has exactly
  microsecond precision, and a typed instant spares readers a string format; `received_at`,
  a string in the dataclass, stays the same string as in JSON.
Every schema allows additional properties: consumers must tolerate fields added later.

What the raw JSON Schema cannot say; the validator stays the authority and rejects these:
- the time range: `event_time` before MIN_EVENT_TIME or over MAX_FUTURE after the validator's
  clock (a rule that depends on the clock cannot be a schema); nor the length of the month
  (`2019-02-30` matches the pattern);
- `event_time` spellings: the pattern admits the two documented forms (the dataset's
  `2019-10-01 00:00:00 UTC`, and ISO-8601 with `T` or a space, optional seconds, fraction and
  `Z`/offset). Python's parser also takes week dates, the basic format or `2019-1-1 0:0:0 UTC`;
  producers must not rely on those, so there the schema is stricter than the validator;
- the int64 range of decimal strings: the pattern allows 19 digits, so `"9999999999999999999"`
  passes and is `int_out_of_range` (an exact regex exists but nobody could review it); the
  other way round, the validator takes zero padding past 19 digits, the schema does not;
- a price string that overflows a double (`"1e999"`, `bad_price`). The other way round, the
  validator takes a negative zero (`"-0"`, or `"-1e-999"` which underflows) as a price of 0,
  the schema does not: producers should not write a minus sign;
- lone surrogates (`invalid_string`): a schema sees code points, not their UTF-8 encoding;
- the byte-level rules (`message_too_large`, `not_utf8`, `malformed_json`) come before any
  schema. Around numbers the validator strips ASCII whitespace only, as the patterns say;
  around timestamps it strips any whitespace, `\\s` in the pattern (ECMA-262 and Python
  differ on a few control characters there).
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from collections.abc import Sequence
from dataclasses import fields
from datetime import datetime
from pathlib import Path
from typing import Any, get_args, get_type_hints

from easymlops.schema import (
    _INT_TEXT,
    ERROR_TYPES,
    EVENT_TYPES,
    FIELD_ORDER,
    INT64_MAX,
    INT64_MIN,
    MAX_STRING_LENGTH,
    OPTIONAL_FIELDS,
    REQUIRED_FIELDS,
    DeadLetter,
    Event,
)

CONTRACTS_DIR = Path(__file__).parent / "contracts"
DIALECT = "https://json-schema.org/draft/2020-12/schema"
AVRO_NAMESPACE = "easymlops.events"

# Decimal strings, surrounded by the ASCII whitespace the validator strips. The integer is the
# validator's own regex for the form producers should send; the price is its decimal grammar
# without the NaN/infinity spellings and without a minus sign.
_SPACE = "[ \\t\\r\\n]*"
INT_TEXT_PATTERN = rf"^{_SPACE}({_INT_TEXT.pattern}){_SPACE}$"
PRICE_TEXT_PATTERN = rf"^{_SPACE}\+?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]+)?{_SPACE}$"

_DATE = r"[0-9]{4}-(0[1-9]|1[0-2])-(0[1-9]|[12][0-9]|3[01])"
_HOUR_MINUTE = r"([01][0-9]|2[0-3]):[0-5][0-9]"
_CSV_TIME = rf"{_DATE} {_HOUR_MINUTE}:[0-5][0-9] UTC"
_ISO_TIME = rf"{_DATE}[T ]{_HOUR_MINUTE}(:[0-5][0-9](\.[0-9]+)?)?(Z|[+-][0-9]{{2}}(:?[0-9]{{2}})?)?"
RAW_TIME_PATTERN = rf"^\s*({_CSV_TIME}|{_ISO_TIME})\s*$"
# schema.format_time's output, the only form a validated event or a dead letter carries.
VALIDATED_TIME_PATTERN = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z$"

_INT64 = {"minimum": INT64_MIN, "maximum": INT64_MAX}
# What DeadLetter.build writes: text when the bytes are UTF-8, else base64.
PAYLOAD_ENCODINGS = ("utf-8", "base64")


def _unwrap(hint: Any) -> tuple[Any, bool]:
    """`X | None` -> (X, True); `X` -> (X, False)."""
    if isinstance(hint, types.UnionType):
        inner = [arg for arg in get_args(hint) if arg is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"cannot export the union {hint}")
        return inner[0], True
    return hint, False


def _nullable(fragment: dict[str, Any]) -> dict[str, Any]:
    if isinstance(fragment.get("type"), str):
        return {**fragment, "type": [fragment["type"], "null"]}
    return {"anyOf": [fragment, {"type": "null"}]}


def _raw_field(name: str, hint: Any) -> dict[str, Any]:
    """What `schema.validate_record` accepts for one field (by type, as its rules are)."""
    base, _ = _unwrap(hint)
    if name == "event_type":
        return {"enum": list(EVENT_TYPES)}
    if base is datetime:
        return {
            "type": "string",
            "pattern": RAW_TIME_PATTERN,
            "description": "`2019-10-01 00:00:00 UTC` or ISO-8601 (naive means UTC)",
        }
    if base is int:
        return {
            "anyOf": [
                {"type": "integer", **_INT64},
                {"type": "string", "pattern": INT_TEXT_PATTERN},
            ],
            "description": "int64, as a JSON number or ASCII decimal digits",
        }
    if base is float:  # schema._price, the one float rule: finite and >= 0
        return {
            "anyOf": [
                {"type": "number", "minimum": 0, "maximum": sys.float_info.max},
                {"type": "string", "pattern": PRICE_TEXT_PATTERN},
            ],
            "description": "finite and >= 0, as a JSON number or a decimal string",
        }
    if base is str:
        fragment: dict[str, Any] = {"type": "string", "maxLength": MAX_STRING_LENGTH}
        if name in REQUIRED_FIELDS:
            fragment["pattern"] = r"\S"  # blank is missing_field
        return fragment
    raise TypeError(f"no raw JSON Schema rule for {name}: {hint}")


def _output_field(name: str, hint: Any) -> dict[str, Any]:
    """One field as `Event.to_json_dict` / `DeadLetter.to_json_bytes` write it."""
    base, nullable = _unwrap(hint)
    fragment: dict[str, Any]
    if name == "event_type":
        fragment = {"enum": list(EVENT_TYPES)}
    elif name == "error_type":
        fragment = {
            "enum": list(ERROR_TYPES),
            "description": "; ".join(f"{k}: {v}" for k, v in ERROR_TYPES.items()),
        }
    elif name == "payload_encoding":
        fragment = {"enum": list(PAYLOAD_ENCODINGS)}
    elif base is datetime or name == "received_at":
        fragment = {"type": "string", "format": "date-time", "pattern": VALIDATED_TIME_PATTERN}
    elif base is bool:
        fragment = {"type": "boolean"}
    elif base is int:
        fragment = {"type": "integer", **_INT64}
    elif base is float:
        fragment = {"type": "number", "minimum": 0}
    elif base is str and name in FIELD_ORDER:
        # Empty optional strings became null, blank required ones were rejected.
        fragment = {"type": "string", "minLength": 1, "maxLength": MAX_STRING_LENGTH}
        if name in REQUIRED_FIELDS:
            fragment["pattern"] = r"\S"
    elif base is str:
        fragment = {"type": "string"}
    else:
        raise TypeError(f"no JSON Schema rule for {name}: {hint}")
    return _nullable(fragment) if nullable else fragment


def _event_hints() -> dict[str, Any]:
    hints = get_type_hints(Event)
    if list(hints) != list(FIELD_ORDER) or set(FIELD_ORDER) != {
        *REQUIRED_FIELDS,
        *OPTIONAL_FIELDS,
    }:
        raise ValueError("schema.py disagrees with itself: Event, FIELD_ORDER, REQUIRED/OPTIONAL")
    return hints


def _json_schema(
    title: str, description: str, properties: dict[str, Any], required: Sequence[str]
) -> dict[str, Any]:
    return {
        "$schema": DIALECT,
        "$id": f"urn:easymlops:contracts:{title}",
        "title": title,
        "description": description,
        "type": "object",
        "properties": properties,
        "required": list(required),
        "additionalProperties": True,
    }


def raw_event_schema() -> dict[str, Any]:
    hints = _event_hints()
    return _json_schema(
        "raw_event",
        "An event as producers write it to events.raw; the validator (easymlops/schema.py) "
        "is the authority. Optional fields may be absent, null or empty; event_id is derived "
        "when absent; unknown properties are accepted and dropped.",
        {
            name: _nullable(_raw_field(name, hints[name]))
            if name in OPTIONAL_FIELDS
            else _raw_field(name, hints[name])
            for name in FIELD_ORDER
        },
        REQUIRED_FIELDS,
    )


def validated_event_schema() -> dict[str, Any]:
    hints = _event_hints()
    return _json_schema(
        "validated_event",
        "A validated event on events.validated (Event.to_json_dict); every field is present.",
        {name: _output_field(name, hints[name]) for name in FIELD_ORDER},
        FIELD_ORDER,
    )


def dead_letter_schema() -> dict[str, Any]:
    hints = get_type_hints(DeadLetter)
    names = [f.name for f in fields(DeadLetter)]
    return _json_schema(
        "dead_letter",
        "A rejected message on events.invalid: the original payload (utf-8 text or base64) "
        "and why it was rejected.",
        {name: _output_field(name, hints[name]) for name in names},
        names,
    )


def _avro_type(name: str, hint: Any) -> Any:
    base, nullable = _unwrap(hint)
    avro: Any
    if base is datetime:
        avro = {"type": "long", "logicalType": "timestamp-micros"}
    elif base in (int, float, bool, str):
        avro = {int: "long", float: "double", bool: "boolean", str: "string"}[base]
    else:
        raise TypeError(f"no Avro type for {name}: {hint}")
    return ["null", avro] if nullable else avro


def _avro_field(name: str, hint: Any) -> dict[str, Any]:
    field: dict[str, Any] = {"name": name, "type": _avro_type(name, hint)}
    if _unwrap(hint)[1]:
        field["default"] = None
    if name == "event_type":
        field["doc"] = "one of " + ", ".join(EVENT_TYPES)
    elif name == "error_type":
        field["doc"] = "one of " + ", ".join(ERROR_TYPES)
    elif name == "payload_encoding":
        field["doc"] = "one of " + ", ".join(PAYLOAD_ENCODINGS)
    elif name == "received_at":
        field["doc"] = "UTC, as 2019-10-01T00:00:00.000000Z"
    return field


def validated_event_avro() -> dict[str, Any]:
    hints = _event_hints()
    return {
        "type": "record",
        "name": "ValidatedEvent",
        "namespace": AVRO_NAMESPACE,
        "doc": "A validated event on events.validated (easymlops/schema.py Event).",
        "fields": [_avro_field(name, hints[name]) for name in FIELD_ORDER],
    }


def dead_letter_avro() -> dict[str, Any]:
    hints = get_type_hints(DeadLetter)
    return {
        "type": "record",
        "name": "DeadLetter",
        "namespace": AVRO_NAMESPACE,
        "doc": "A rejected message on events.invalid (easymlops/schema.py DeadLetter).",
        "fields": [_avro_field(f.name, hints[f.name]) for f in fields(DeadLetter)],
    }


def render() -> dict[str, str]:
    """File name -> exact text (insertion order is fixed, so the output is deterministic)."""
    documents = {
        "raw_event.schema.json": raw_event_schema(),
        "validated_event.schema.json": validated_event_schema(),
        "dead_letter.schema.json": dead_letter_schema(),
        "validated_event.avsc": validated_event_avro(),
        "dead_letter.avsc": dead_letter_avro(),
    }
    return {name: json.dumps(doc, indent=2) + "\n" for name, doc in documents.items()}


def stale_files(directory: Path = CONTRACTS_DIR) -> list[str]:
    """Names of the files in `directory` that differ from `render()`, are missing, or are
    contract files (.json/.avsc) that nothing generates any more."""
    expected = render()
    stale = [
        name
        for name, text in expected.items()
        if not (directory / name).is_file() or (directory / name).read_bytes() != text.encode()
    ]
    if directory.is_dir():
        stale += sorted(
            path.name
            for path in directory.iterdir()
            if path.suffix in (".json", ".avsc") and path.name not in expected
        )
    return stale


def write(directory: Path = CONTRACTS_DIR) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (directory / name).write_bytes(text.encode())


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m easymlops.schema_export",
        description="Generate easymlops/contracts/ from easymlops/schema.py.",
    )
    parser.add_argument("--check", action="store_true", help="compare only; exit 1 if stale")
    parser.add_argument("--dir", type=Path, default=CONTRACTS_DIR, help="contracts directory")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files(args.dir)
        generated = render()
        for name in stale:
            what = "stale" if name in generated else "not generated any more (delete it)"
            print(f"{what}: {args.dir / name}", file=sys.stderr)
        if stale:
            print("regenerate with: uv run python -m easymlops.schema_export", file=sys.stderr)
        return 1 if stale else 0
    write(args.dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
