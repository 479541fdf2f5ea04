"""The PyFlink validation job (flink_jobs/validation_job.py) run for real on a local Flink
mini-cluster, in its bounded mode: the same topology as production (route -> main output +
dead-letter side output -> keyed session state), fed from a JSON-lines file and writing files.

One job run per module (a mini-cluster start costs seconds) on a file mixing generated events,
rows of the public dataset in the CSV-derived JSON form, and hand-crafted bad messages; the tests
check the exact split, that the Flink output is byte-identical to what the local runner's rules
(`easymlops.schema.route`, in-process) produce, and that the session hashes equal
`session_fields(events)`, what the local runner's writer stores in Redis.

The Kafka mode (Kafka source, exactly-once Kafka sinks, checkpoint recovery, savepoints, the Redis
sink) runs on a standalone Flink cluster in tests/test_flink_kafka.py.

The job runs in `.flink-venv` (PyFlink pins old pandas/pyarrow): a missing venv fails these
tests with a pointer to `make flink-venv`; it never skips them.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from test_validation_acceptance import bad  # the same base event, one field changed

from easymlops.csv_replay import read_csv_events
from easymlops.generator import INVALID_KINDS, encode_event, generate_events, make_invalid
from easymlops.schema import MAX_MESSAGE_BYTES, Event, parse_time, route, validate_bytes
from easymlops.session_features import session_fields

ROOT = Path(__file__).resolve().parent.parent
FLINK_PYTHON = ROOT / ".flink-venv" / "bin" / "python"
FIXTURE_CSV = Path(__file__).parent / "fixtures" / "ecommerce_sample.csv"
TOPIC = "flink-test.raw"  # passed as EASYMLOPS_TOPIC_RAW: the job must read it from Settings

# Each hand-crafted message and the error_type it must be dead-lettered with.
HAND_CRAFTED: list[tuple[bytes, str]] = [
    (b'{"event_type": "view", "price": ', "malformed_json"),
    (b"", "malformed_json"),  # an empty line inside the file is an empty message
    (b"\xff\xfe\x00\x81garbage\x00\x9c\xc3", "not_utf8"),
    (bad(user_id=...), "missing_field"),
    (bad(event_time=None), "missing_field"),
    (bad(product_id="abc"), "wrong_type"),
    (bad(price="12,50"), "wrong_type"),
    (bad(user_session=12345), "wrong_type"),
    (b"[1, 2, 3]", "wrong_type"),
    (bad(price=-3.5), "bad_price"),
    (bad(event_type="click"), "unknown_event_type"),
    (bad(brand="x" * 70_000), "message_too_large"),
    (bad(event_time="2999-01-01T00:00:00Z"), "timestamp_in_future"),
    (bad(event_time="yesterday"), "bad_timestamp"),
    (bad(user_id=2**64), "int_out_of_range"),
]
# The fixture CSV's last two rows are broken on purpose (price "abc", no user_session).
CSV_ERRORS = {29: "wrong_type", 30: "missing_field"}


@dataclass
class FlinkRun:
    lines: list[bytes]  # the input file's messages; offset = index
    expected: list[str | None]  # error_type per offset, None for a valid one
    generated_ids: Counter[str]  # event ids of the generated events in the file
    output: Path
    proc: subprocess.CompletedProcess[str]
    started: datetime
    finished: datetime
    seconds: float


def flink_python() -> Path:
    if not FLINK_PYTHON.exists():
        pytest.fail(
            f"{FLINK_PYTHON.relative_to(ROOT)} is missing: run `make flink-venv` first "
            "(the PyFlink job has its own virtualenv, see flink_jobs/README.md)"
        )
    return FLINK_PYTHON


def run_job(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EASYMLOPS_TOPIC_RAW": TOPIC}
    return subprocess.run(
        [str(flink_python()), "-m", "flink_jobs.validation_job", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        errors="replace",
        timeout=timeout,
    )


def build_input() -> tuple[list[bytes], list[str | None], Counter[str]]:
    generated = list(generate_events(400, days=2, seed=11))
    messages: list[tuple[bytes, str | None]] = [(encode_event(e), None) for e in generated]
    generated_ids = Counter(e["event_id"] for e in generated)
    # A producer retry: the same event twice. Both are valid; the session counts it once.
    messages.insert(57, messages[50])
    generated_ids[generated[50]["event_id"]] += 1
    for index, payload in enumerate(read_csv_events(FIXTURE_CSV)):
        messages.append((payload, CSV_ERRORS.get(index)))
    rng = np.random.default_rng(5)
    corrupted = [
        (make_invalid(rng, base=generated[i * 7], kind=kind), kind)
        for i, kind in enumerate(INVALID_KINDS)
    ]
    # Spread the bad messages over the file, so dead-letter offsets are not all at the end.
    for position, item in zip(range(3, 10**6, 23), HAND_CRAFTED + corrupted, strict=False):
        messages.insert(position, item)
    assert all(b"\n" not in payload for payload, _ in messages)
    return [m for m, _ in messages], [e for _, e in messages], generated_ids


@pytest.fixture(scope="module")
def flink_run(tmp_path_factory: pytest.TempPathFactory) -> FlinkRun:
    flink_python()
    base = tmp_path_factory.mktemp("flink")
    lines, expected, generated_ids = build_input()
    source = base / "raw.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    output = base / "out"
    started = datetime.now(UTC)
    clock = time.monotonic()
    proc = run_job("bounded", "--input", str(source), "--output", str(output))
    seconds = time.monotonic() - clock
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return FlinkRun(
        lines, expected, generated_ids, output, proc, started, datetime.now(UTC), seconds
    )


def read_parts(directory: Path) -> list[bytes]:
    return [
        line
        for part in sorted(directory.glob("*.jsonl"))
        for line in part.read_bytes().splitlines()
    ]


def dead_letters(run: FlinkRun) -> dict[int, dict[str, Any]]:
    letters = [json.loads(line) for line in read_parts(run.output / "invalid")]
    by_offset = {letter["source_offset"]: letter for letter in letters}
    assert len(by_offset) == len(letters), "one dead letter per raw message"
    return by_offset


def local_runner_routing(run: FlinkRun) -> list[Any]:
    """What the local runner produces for the same messages: `route`, in this process."""
    return [
        route(line, key=None, topic=TOPIC, partition=0, offset=offset, received_at=run.finished)
        for offset, line in enumerate(run.lines)
    ]


def test_every_message_lands_once_with_the_expected_reason(flink_run: FlinkRun) -> None:
    valid_lines = read_parts(flink_run.output / "valid")
    letters = dead_letters(flink_run)
    expected_invalid = {o: e for o, e in enumerate(flink_run.expected) if e is not None}
    assert len(valid_lines) + len(letters) == len(flink_run.lines)  # valid + invalid = raw
    assert {o: letter["error_type"] for o, letter in letters.items()} == expected_invalid
    assert len(valid_lines) == len(flink_run.lines) - len(expected_invalid)

    for offset, letter in letters.items():
        original = flink_run.lines[offset]
        assert letter["source_topic"] == TOPIC
        assert letter["source_partition"] == 0
        assert letter["payload_bytes"] == len(original)
        assert letter["payload_truncated"] == (len(original) > MAX_MESSAGE_BYTES)
        payload = letter["payload"]
        kept = (
            base64.b64decode(payload)
            if letter["payload_encoding"] == "base64"
            else payload.encode()
        )
        assert kept == original[:MAX_MESSAGE_BYTES]
        if letter["error_type"] == "not_utf8":
            assert letter["payload_encoding"] == "base64"
        received = parse_time(letter["received_at"])
        assert flink_run.started - timedelta(seconds=1) <= received <= flink_run.finished

    events = [validate_bytes(line) for line in valid_lines]
    ids = Counter(e.event_id for e in events)
    assert all(ids[i] == n for i, n in flink_run.generated_ids.items())
    assert sum(ids.values()) - sum(flink_run.generated_ids.values()) == 29  # the good CSV rows

    summary = flink_run.proc.stdout
    assert f"valid {len(valid_lines)}, invalid {len(letters)}" in summary
    assert "events/s" in summary


def test_output_is_what_the_local_runner_rules_produce(flink_run: FlinkRun) -> None:
    routed = local_runner_routing(flink_run)
    expected_valid = sorted(r.value for r in routed if r.destination == "valid")
    assert sorted(read_parts(flink_run.output / "valid")) == expected_valid  # byte-identical

    expected_letters = {
        offset: json.loads(r.value) for offset, r in enumerate(routed) if r.destination == "invalid"
    }
    letters = dead_letters(flink_run)
    for letter in (*letters.values(), *expected_letters.values()):
        letter.pop("received_at")
    assert letters == expected_letters


def test_sessions_hold_one_field_per_distinct_event(flink_run: FlinkRun) -> None:
    sessions = [json.loads(line) for line in read_parts(flink_run.output / "sessions")]
    flink = {s.pop("user_session"): s for s in sessions}
    assert len(flink) == len(sessions), "one line per session"

    by_session: dict[str, dict[str, Event]] = defaultdict(dict)
    for r in local_runner_routing(flink_run):
        if r.event is not None:  # each event id once, like the local runner's Redis hash
            by_session[r.event.user_session][r.event.event_id] = r.event
    expected = {s: session_fields(events.values()) for s, events in by_session.items()}
    assert len(expected) > 40
    assert flink == expected


def test_bad_input_path_fails_with_a_clear_message(tmp_path: Path) -> None:
    proc = run_job("bounded", "--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path))
    assert proc.returncode != 0
    assert "nope.jsonl does not exist" in proc.stderr


def test_kafka_mode_names_the_missing_connector_jar() -> None:
    """Without the connector on the classpath (as on this machine), the production mode stops at
    once with the fix, instead of failing deep inside job submission."""
    proc = run_job("kafka", timeout=120)
    assert proc.returncode != 0
    assert "flink-sql-connector-kafka" in proc.stderr, proc.stderr[-3000:]
