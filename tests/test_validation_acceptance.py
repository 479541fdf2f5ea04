"""Issue 3's acceptance scenario on the real broker: a public-dataset CSV replayed with
`easymlops produce --from-csv`, hand-crafted bad messages written by an independent Kafka
client, then `easymlops validate --until-idle`: every well-formed row is validated, every bad
message is dead-lettered with its reason and its exact original bytes, and the counts add up;
`make flink-validate` on the same raw messages gives the same split, byte for byte."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import subprocess
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


ROOT = Path(__file__).resolve().parent.parent
# Envelope fields that depend on where and when a message was read, not on what it holds: the
# bounded Flink job reads a file (partition 0, offset = line number) at another moment.
WHERE_AND_WHEN = ("source_partition", "source_offset", "received_at")


def comparable(letter: bytes) -> str:
    fields = json.loads(letter)
    return json.dumps({k: v for k, v in fields.items() if k not in WHERE_AND_WHEN}, sort_keys=True)


def flink_validate(raw: list[bytes], base: Path) -> tuple[list[bytes], list[bytes]]:
    """`make flink-validate` on `raw`, one message a line; returns (valid, invalid) lines."""
    assert all(b"\n" not in message for message in raw)
    source = base / "raw.jsonl"
    source.write_bytes(b"\n".join(raw) + b"\n")
    output = base / "flink-out"
    # A clean make environment: under `make test` the outer make's flags would leak in.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MAKELEVEL", "MFLAGS")}
    done = subprocess.run(
        ["make", "--no-print-directory", "flink-validate", f"INPUT={source}", f"OUTPUT={output}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=600,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]

    def lines(name: str) -> list[bytes]:
        return [
            ln
            for p in sorted((output / name).glob("*.jsonl"))
            for ln in p.read_bytes().splitlines()
        ]

    return lines("valid"), lines("invalid")


def test_csv_replay_and_hand_crafted_bad_messages(isolated: Settings, tmp_path: Path) -> None:
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

    # The Flink job, bounded, on the same raw messages: the same validated events, byte for
    # byte, and the same dead letters (reason, message, original payload).
    raw = [value for _, _, value in sorted(read_all(isolated, isolated.topic_raw))]
    assert len(raw) == raw_total
    flink_valid, flink_invalid = flink_validate(raw, tmp_path)
    runner_valid = [v for _, _, v in read_all(isolated, isolated.topic_validated)]
    runner_invalid = [v for _, _, v in read_all(isolated, isolated.topic_invalid)]
    assert sorted(flink_valid) == sorted(runner_valid)
    assert sorted(map(comparable, flink_invalid)) == sorted(map(comparable, runner_invalid))
