"""Issue 3's acceptance scenario on the real broker: a public-dataset CSV replayed with
`easymlops produce --from-csv`, hand-crafted bad messages written by an independent Kafka
client, then `easymlops validate --until-idle`: every well-formed row is validated, every bad
message is dead-lettered with its reason and its exact original bytes, and the counts add up."""

from __future__ import annotations

import base64
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from test_validator_faults import read_all
from typer.testing import CliRunner

from easymlops.cli import app
from easymlops.csv_replay import read_csv_events
from easymlops.kafka import end_offsets, ensure_topics
from easymlops.schema import MAX_MESSAGE_BYTES, ValidationError, validate_bytes
from easymlops.settings import Settings, get_settings

pytestmark = pytest.mark.services

FIXTURE_CSV = Path(__file__).parent / "fixtures" / "ecommerce_sample.csv"
GOOD = {
    "event_time": "2019-10-01 00:00:00 UTC",
    "event_type": "view",
    "product_id": 44600062,
    "category_id": 2103807459595387724,
    "category_code": "",
    "brand": "shiseido",
    "price": 35.79,
    "user_id": 541312140,
    "user_session": "72d76fde-8bb3-4e00-8c23-a032dfed738c",
}


def bad(**change: object) -> bytes:
    record = {**GOOD, **change}
    return json.dumps({k: v for k, v in record.items() if v is not ...}).encode()


# Each hand-crafted message and the reason it must be rejected with.
BAD_MESSAGES: list[tuple[bytes, str]] = [
    (b'{"event_type": "view", "price": ', "malformed_json"),
    (b"\xff\xfe\x00\x81garbage\x00\x9c", "not_utf8"),
    (bad(user_id=...), "missing_field"),
    (bad(user_session=""), "missing_field"),
    (bad(product_id="abc"), "wrong_type"),
    (bad(price=True), "wrong_type"),
    (bad(price=-3.5), "bad_price"),
    (bad(event_type="click"), "unknown_event_type"),
    (bad(user_id=2**64), "int_out_of_range"),
    (bad(event_time="yesterday"), "bad_timestamp"),
    (bad(event_time="2999-01-01T00:00:00Z"), "timestamp_in_future"),
    (bad(brand="b" * 1000), "string_too_long"),
    (bad(brand="x" * 70_000), "message_too_large"),
    (b"[1, 2, 3]", "wrong_type"),
    (b"[" * 60_000, "malformed_json"),  # nests too deep for the parser
]


@pytest.fixture
def isolated(stack: Settings, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    name = f"accept-{uuid.uuid4().hex[:8]}"
    for suffix in ("raw", "validated", "invalid", "predictions"):
        monkeypatch.setenv(f"EASYMLOPS_TOPIC_{suffix.upper()}", f"{name}.{suffix}")
    get_settings.cache_clear()
    settings = get_settings()
    ensure_topics(settings)
    yield settings
    get_settings.cache_clear()


def test_csv_replay_and_hand_crafted_bad_messages(isolated: Settings) -> None:
    runner = CliRunner()
    replay = runner.invoke(app, ["produce", "--from-csv", str(FIXTURE_CSV)])
    assert replay.exit_code == 0, replay.output

    independent = Producer({"bootstrap.servers": isolated.bootstrap_servers})
    for payload, _ in BAD_MESSAGES:
        independent.produce(isolated.topic_raw, payload, key=b"hand-crafted")
    assert independent.flush(30) == 0

    result = runner.invoke(app, ["validate", "--until-idle", "--idle-seconds", "2"])
    assert result.exit_code == 0, result.output

    rows = list(read_csv_events(FIXTURE_CSV))
    well_formed = []
    for row in rows:
        with contextlib.suppress(ValidationError):
            well_formed.append(validate_bytes(row).event_id)
    assert len(well_formed) == 29  # the fixture holds two broken real-format rows

    raw_total = sum(end_offsets(isolated, isolated.topic_raw).values())
    assert raw_total == len(rows) + len(BAD_MESSAGES)
    validated = [validate_bytes(v) for _, _, v in read_all(isolated, isolated.topic_validated)]
    invalid = [json.loads(v) for _, _, v in read_all(isolated, isolated.topic_invalid)]
    assert len(validated) + len(invalid) == raw_total
    assert sorted(e.event_id for e in validated) == sorted(well_formed)

    # Every hand-crafted message is dead-lettered once, with its reason and original bytes.
    letters = {}
    for letter in invalid:
        kept = letter["payload"]
        original = (
            base64.b64decode(kept) if letter["payload_encoding"] == "base64" else kept.encode()
        )
        letters[original] = letter
    for payload, reason in BAD_MESSAGES:
        letter = letters[payload[:MAX_MESSAGE_BYTES]]
        assert letter["error_type"] == reason, (payload[:60], letter["error_message"])
        assert letter["error_message"]
        assert letter["payload_bytes"] == len(payload)
        assert letter["payload_truncated"] == (len(payload) > MAX_MESSAGE_BYTES)
        assert letter["source_topic"] == isolated.topic_raw
        assert letter["source_offset"] >= 0 and letter["received_at"]
    assert len(invalid) == len(BAD_MESSAGES) + 2
