"""The PyFlink stream validation job: events.raw -> events.validated | events.invalid, plus the
real-time session features in Redis. Production counterpart of `easymlops validate`.

Topology (built once, by `build_topology`, for both modes):

    raw messages Row(key, value, topic, partition, offset, headers)
      -> RouteFunction: easymlops.schema.route(...)      (the rules are imported, never copied)
           main output   validated (key, value, Event, headers)
                           -> Row(key, value, headers) -> valid sink
           side output   dead letters Row(key, value, headers) -> invalid sink
         (headers: the raw message's `traceparent`, forwarded: forwarded_headers)
      -> SessionEventField: easymlops.session_features.event_field, per validated event
         (user_session, {e:{event_id}: "micros|rank|product"})   -> session sink

Modes:

- `kafka` (production): the raw topic is read through the Kafka table connector (a KafkaSource
  with committed group offsets, else earliest), because PyFlink's DataStream KafkaSource only
  offers value-only deserializers and a dead letter needs the key, partition and offset. Both
  outputs go to KafkaSinks with DeliveryGuarantee.EXACTLY_ONCE (transactions committed on
  checkpoints); each event's field is written to its session's hash in Redis (HSET + EXPIRE,
  exactly what the local runner writes: idempotent per event id, so a replay after a restore
  rewrites the same fields). The session stage keeps no state (uid "session-events"; a savepoint
  of the former keyed-state stage "session-features" restores with --allowNonRestoredState).
  Needs the flink-sql-connector-kafka jar (infra/flink/Dockerfile puts it in /opt/flink/lib; or
  pass --jar).
- `bounded` (tests, replays of files): the same topology on a local mini-cluster, fed from a
  JSON-lines file read as bytes in the driver (so non-UTF-8 lines survive; topic = the raw topic,
  partition 0, offset = line index), writing DIR/valid/, DIR/invalid/ and DIR/sessions/ (one line
  per session: the hash its fields add up to in Redis).

    python -m flink_jobs.validation_job bounded --input events.jsonl --output out/
    python -m flink_jobs.validation_job kafka --checkpoint-interval-ms 10000

Run from the repository root with the repository on PYTHONPATH (`make flink-validate` does both).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyflink.common import Configuration, Row, Types
from pyflink.datastream import (
    CheckpointingMode,
    DataStream,
    MapFunction,
    OutputTag,
    ProcessFunction,
    RuntimeContext,
    StreamExecutionEnvironment,
)
from pyflink.datastream.functions import KeySelector

from easymlops.features import session_key
from easymlops.schema import Event, route
from easymlops.session_features import event_field
from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
BYTES = Types.PRIMITIVE_ARRAY(Types.BYTE())
HEADERS = Types.MAP(Types.STRING(), BYTES)
# One raw Kafka message, as both sources produce it.
RAW_FIELDS = ["key", "value", "topic", "partition", "offset", "headers"]
RAW_TYPE = Types.ROW_NAMED(
    RAW_FIELDS, [BYTES, BYTES, Types.STRING(), Types.INT(), Types.LONG(), HEADERS]
)
# One record to produce: what the Kafka sinks serialize (key, value and record headers).
RECORD_TYPE = Types.ROW_NAMED(["key", "value", "headers"], [BYTES, BYTES, HEADERS])
TRACEPARENT = "traceparent"  # the W3C trace context header (easymlops.telemetry.TRACEPARENT)
DEAD_LETTERS = OutputTag("dead-letters", RECORD_TYPE)

DEFAULT_GROUP_ID = "easymlops-flink-validator"
DEFAULT_TRANSACTIONAL_ID_PREFIX = "easymlops-flink-validator"
KAFKA_CONNECTOR_HINT = (
    "the Flink Kafka connector (flink-sql-connector-kafka) is not on the classpath: run the job "
    "in the infra/flink image (the jar is in /opt/flink/lib) or pass "
    "--jar file:///path/to/flink-sql-connector-kafka-<version>.jar"
)


# ---- the topology ---------------------------------------------------------------------------
def forwarded_headers(raw_headers: dict[str, bytes] | None) -> dict[str, bytes]:
    """The headers an output record carries over from its raw message: the producer's
    `traceparent`, so landing continues the producer's trace (what the local runner forwards
    when tracing is off; the job has no spans of its own)."""
    traceparent = (raw_headers or {}).get(TRACEPARENT)
    return {TRACEPARENT: traceparent} if traceparent is not None else {}


class RouteFunction(ProcessFunction):
    """Validate each raw message with `easymlops.schema.route` (never raises): a validated event
    goes to the main output as (key, value, Event, headers), a dead letter to the DEAD_LETTERS
    side output as Row(key, value, headers)."""

    def open(self, runtime_context: RuntimeContext) -> None:
        # Flink's metric system counts what the job routed, per destination. The cluster's
        # Prometheus reporter (easymlops.flink_cluster) exports them as
        # flink_taskmanager_job_task_operator_easymlops_destination_events{destination=...},
        # the Flink counterpart of the local runner's easymlops_validator_events_total.
        group = runtime_context.get_metrics_group().add_group("easymlops")
        self.routed = {
            destination: group.add_group("destination", destination).counter("events")
            for destination in ("valid", "invalid")
        }

    def process_element(self, value: Row, ctx: ProcessFunction.Context) -> Any:
        routed = route(
            value[1],
            key=value[0],
            topic=value[2],
            partition=value[3],
            offset=value[4],
            received_at=datetime.now(UTC),
        )
        self.routed[routed.destination].inc()
        headers = forwarded_headers(value[5])
        if routed.destination == "valid":
            yield routed.key, routed.value, routed.event, headers
        else:
            yield DEAD_LETTERS, Row(routed.key, routed.value, headers)


class ToRecord(MapFunction):
    """(key, value, Event, headers) -> Row(key, value, headers), the typed form the sinks
    serialize."""

    def map(self, value: tuple[bytes, bytes, Event, dict[str, bytes]]) -> Row:
        return Row(value[0], value[1], value[3])


class BySession(KeySelector):
    """The session of a (user_session, fields) pair: one writer per session in bounded mode."""

    def get_key(self, value: tuple[str, dict[str, str]]) -> str:
        return value[0]


class SessionEventField(MapFunction):
    """A validated event -> (user_session, {field: value}), the field that stands for it in its
    session's hash (easymlops.session_features.event_field). Stateless: the hash keeps the
    session's events and serving computes the features from them; a repeated event id rewrites
    the same field."""

    def map(
        self, value: tuple[bytes, bytes, Event, dict[str, bytes]]
    ) -> tuple[str, dict[str, str]]:
        event = value[2]
        name, encoded = event_field(event)
        return event.user_session, {name: encoded}


@dataclass(frozen=True)
class Streams:
    valid: DataStream  # Row(key, value, headers): events.validated
    invalid: DataStream  # Row(key, value, headers): events.invalid (dead-letter envelopes)
    sessions: DataStream  # (user_session, {field: value}): feat:session:{id}, one per event


def build_topology(raw: DataStream, settings: Settings) -> Streams:
    """The job's logic, shared by both modes; `raw` carries RAW_TYPE rows."""
    routed = raw.process(RouteFunction(), output_type=Types.PICKLED_BYTE_ARRAY()).name(
        "validate: easymlops.schema.route"
    )
    routed.uid("validate")
    # Taken right after the process function (PyFlink loses side outputs otherwise).
    invalid = routed.get_side_output(DEAD_LETTERS)
    valid = routed.map(ToRecord(), output_type=RECORD_TYPE).name("validated record")
    sessions = routed.map(SessionEventField(), output_type=Types.PICKLED_BYTE_ARRAY()).name(
        "session events: event_field"
    )
    sessions.uid("session-events")
    return Streams(valid=valid, invalid=invalid, sessions=sessions)


def _environment(
    parallelism: int, config: Configuration | None = None
) -> StreamExecutionEnvironment:
    env = StreamExecutionEnvironment.get_execution_environment(config)
    # Python workers must run this interpreter (the one with pyflink), not whatever `python` is.
    env.set_python_executable(sys.executable)
    env.set_parallelism(parallelism)
    return env


# ---- kafka mode (production) ----------------------------------------------------------------
class RedisSessionSink(MapFunction):
    """Write each event's field to its session's hash: HSET + EXPIRE (the TTL counts from the
    session's last write, as in the local runner), in one MULTI. Idempotent per event id, so the
    replay after a restore from a checkpoint rewrites the same fields. A Redis error fails the
    task; Flink restarts it."""

    def __init__(self, redis_url: str, ttl_seconds: int) -> None:
        self.redis_url = redis_url
        self.ttl_seconds = ttl_seconds
        self.client: Any = None

    def open(self, runtime_context: RuntimeContext) -> None:
        import redis

        self.client = redis.Redis.from_url(
            self.redis_url, socket_timeout=5, socket_connect_timeout=5
        )

    def map(self, value: tuple[str, dict[str, str]]) -> int:
        user_session, fields = value
        key = session_key(user_session)
        pipe = self.client.pipeline(transaction=True)
        pipe.hset(key, mapping=fields)
        pipe.expire(key, self.ttl_seconds)
        pipe.execute()
        return 1

    def close(self) -> None:
        if self.client is not None:
            self.client.close()


def _kafka_source_ddl(settings: Settings, group_id: str) -> str:
    def quote(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    return f"""
        CREATE TEMPORARY TABLE raw_events (
            `key` BYTES,
            `value` BYTES,
            `topic` STRING METADATA VIRTUAL,
            `partition` INT METADATA VIRTUAL,
            `offset` BIGINT METADATA VIRTUAL,
            `headers` MAP<STRING, BYTES> METADATA VIRTUAL
        ) WITH (
            'connector' = 'kafka',
            'topic' = {quote(settings.topic_raw)},
            'properties.bootstrap.servers' = {quote(settings.bootstrap_servers)},
            'properties.group.id' = {quote(group_id)},
            'properties.isolation.level' = 'read_committed',
            'scan.startup.mode' = 'group-offsets',
            'properties.auto.offset.reset' = 'earliest',
            'key.format' = 'raw',
            'key.fields' = 'key',
            'value.format' = 'raw',
            'value.fields-include' = 'EXCEPT_KEY'
        )
    """


def _kafka_sink_ddl(
    table: str, settings: Settings, topic: str, transactional_id_prefix: str, timeout_ms: int
) -> str:
    """A Kafka sink table writing Row(key, value, headers) as the record's raw key and value
    bytes and its headers, exactly once: transactions committed on checkpoints. The Table
    API's connector rather than the DataStream KafkaSink, whose Python API on PyFlink 2.2
    cannot write a Row's bytes field as the key (RowFieldExtractorSchema is 2.3-only)."""

    def quote(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    return f"""
        CREATE TEMPORARY TABLE {table} (
            `key` BYTES,
            `value` BYTES,
            `headers` MAP<STRING, BYTES> METADATA
        ) WITH (
            'connector' = 'kafka',
            'topic' = {quote(topic)},
            'properties.bootstrap.servers' = {quote(settings.bootstrap_servers)},
            'key.format' = 'raw',
            'key.fields' = 'key',
            'value.format' = 'raw',
            'value.fields-include' = 'EXCEPT_KEY',
            'sink.delivery-guarantee' = 'exactly-once',
            'sink.transactional-id-prefix' = {quote(transactional_id_prefix)},
            -- Must stay under the broker's transaction.max.timeout.ms (Kafka default 15 min)
            -- and well above the checkpoint interval plus a restart.
            'properties.transaction.timeout.ms' = '{int(timeout_ms)}'
        )
    """


def _require_kafka_connector() -> None:
    from pyflink.java_gateway import get_gateway

    jvm = get_gateway().jvm
    loader = jvm.Thread.currentThread().getContextClassLoader()
    try:
        jvm.Class.forName("org.apache.flink.connector.kafka.sink.KafkaSink", False, loader)
    except Exception:
        raise SystemExit(f"error: {KAFKA_CONNECTOR_HINT}") from None


def _job_archive() -> Path:
    """A zip of the packages the Python workers import (easymlops, flink_jobs), package
    directories at its root. A directory given to add_python_file lands on the workers'
    PYTHONPATH itself, so `flink_jobs.validation_job` would not import on a remote taskmanager
    (a mini-cluster hides that: its workers inherit the driver's PYTHONPATH)."""
    archive = Path(tempfile.mkdtemp(prefix="easymlops-flink-")) / "easymlops_job.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as bundle:
        for package in ("easymlops", "flink_jobs"):
            for path in sorted((ROOT / package).rglob("*")):
                if path.is_file() and "__pycache__" not in path.parts:
                    bundle.write(path, path.relative_to(ROOT).as_posix())
    return archive


def run_kafka(args: argparse.Namespace) -> int:
    from pyflink.table import StreamTableEnvironment

    settings = Settings()
    config = Configuration()
    if args.checkpoint_dir:
        config.set_string("execution.checkpointing.dir", args.checkpoint_dir)
    env = _environment(args.parallelism, config)
    for jar in args.jar:
        env.add_jars(jar if "://" in jar else Path(jar).resolve().as_uri())
    _require_kafka_connector()
    # Ship the rules with the job, so task managers need only pyflink (and redis) installed.
    env.add_python_file(str(_job_archive()))
    env.enable_checkpointing(args.checkpoint_interval_ms, CheckpointingMode.EXACTLY_ONCE)

    t_env = StreamTableEnvironment.create(env)
    t_env.execute_sql(_kafka_source_ddl(settings, args.group_id))
    table = t_env.sql_query(
        "SELECT `key`, `value`, `topic`, `partition`, `offset`, `headers` FROM raw_events"
    )
    raw = t_env.to_data_stream(table).map(lambda row: row, output_type=RAW_TYPE).name("raw")
    streams = build_topology(raw, settings)
    prefix = args.transactional_id_prefix
    timeout = args.transaction_timeout_ms
    outputs = t_env.create_statement_set()
    for table, topic, stream in (
        ("validated_sink", settings.topic_validated, streams.valid),
        ("invalid_sink", settings.topic_invalid, streams.invalid),
    ):
        name = topic.rsplit(".", 1)[-1]
        t_env.execute_sql(_kafka_sink_ddl(table, settings, topic, f"{prefix}-{name}", timeout))
        outputs.add_insert(table, t_env.from_data_stream(stream))
    outputs.attach_as_datastream()
    if args.session_features:
        streams.sessions.map(
            RedisSessionSink(settings.redis, settings.session_ttl_seconds), Types.INT()
        ).name("redis: feat:session:*").uid("sink-redis")
    print(
        f"flink validation (kafka): {settings.topic_raw} @ {settings.bootstrap_servers} -> "
        f"{settings.topic_validated} | {settings.topic_invalid}, exactly-once, checkpoint every "
        f"{args.checkpoint_interval_ms} ms, group {args.group_id}",
        flush=True,
    )
    env.execute("easymlops stream validation")
    return 0


# ---- bounded mode (tests, file replays) -----------------------------------------------------
def read_messages(path: Path, topic: str) -> list[Row]:
    """The raw messages of a JSON-lines file, one per line, as bytes (a non-UTF-8 line stays a
    message, rejected as not_utf8); offset = 0-based line index. The empty piece after a final
    newline is not a message."""
    data = path.read_bytes()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return [Row(None, line, topic, 0, offset, {}) for offset, line in enumerate(lines)]


def _part_file(directory: str) -> Path:
    # Named by a uuid, not the subtask index (which PyFlink's thread mode cannot read).
    return Path(directory) / f"part-{uuid.uuid4().hex}.jsonl"


class LineWriter(MapFunction):
    """Append each record's value, one per line, to a file of its own in DIR."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.handle: Any = None

    def open(self, runtime_context: RuntimeContext) -> None:
        self.handle = open(_part_file(self.directory), "wb")  # noqa: SIM115

    def map(self, value: Row) -> int:
        self.handle.write(value[1] + b"\n")
        return 1

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


class SessionWriter(MapFunction):
    """Merge each session's fields into the hash Redis would hold; at the end write one JSON
    object per session."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.path: Path | None = None
        self.latest: dict[str, dict[str, str]] = {}

    def open(self, runtime_context: RuntimeContext) -> None:
        self.path = _part_file(self.directory)

    def map(self, value: tuple[str, dict[str, str]]) -> int:
        self.latest.setdefault(value[0], {}).update(value[1])
        return 1

    def close(self) -> None:
        if self.path is None:
            return
        with self.path.open("w", encoding="utf-8") as handle:
            for user_session, fields in self.latest.items():
                handle.write(json.dumps({"user_session": user_session, **fields}) + "\n")


def _count_lines(directory: Path) -> int:
    return sum(len(p.read_bytes().splitlines()) for p in sorted(directory.glob("part-*.jsonl")))


def run_bounded(args: argparse.Namespace) -> int:
    source = Path(args.input)
    if not source.is_file():
        print(f"error: input file {source} does not exist (or is not a file)", file=sys.stderr)
        return 2
    output = Path(args.output)
    if output.exists() and not output.is_dir():
        print(f"error: output {output} exists and is not a directory", file=sys.stderr)
        return 2
    settings = Settings()
    messages = read_messages(source, settings.topic_raw)
    if not messages:
        print(f"error: input file {source} holds no lines", file=sys.stderr)
        return 2
    dirs = {name: output / name for name in ("valid", "invalid", "sessions")}
    for directory in dirs.values():
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True)

    started = time.monotonic()
    env = _environment(args.parallelism)
    raw = env.from_collection(messages, type_info=RAW_TYPE).name(f"file: {source.name}")
    streams = build_topology(raw, settings)
    streams.valid.map(LineWriter(str(dirs["valid"])), Types.INT()).name("write valid/")
    streams.invalid.map(LineWriter(str(dirs["invalid"])), Types.INT()).name("write invalid/")
    streams.sessions.key_by(BySession(), key_type=Types.STRING()).map(
        SessionWriter(str(dirs["sessions"])), Types.INT()
    ).name("write sessions/")
    result = env.execute(f"easymlops stream validation (bounded: {source.name})")
    wall = time.monotonic() - started
    job_seconds = result.get_net_runtime() / 1000

    valid, invalid, sessions = (_count_lines(dirs[n]) for n in ("valid", "invalid", "sessions"))
    errors: Counter[str] = Counter()
    for part in sorted(dirs["invalid"].glob("part-*.jsonl")):
        errors.update(json.loads(line)["error_type"] for line in part.read_bytes().splitlines())
    print(
        f"flink validation (bounded): {len(messages)} messages -> valid {valid}, "
        f"invalid {invalid}, sessions {sessions}"
    )
    if errors:
        print("  invalid by error_type: " + ", ".join(f"{k} {v}" for k, v in errors.most_common()))
    print(
        f"  {len(messages) / job_seconds:,.0f} events/s over the job's {job_seconds:.2f} s "
        f"({len(messages) / wall:,.0f} events/s over {wall:.2f} s including the mini-cluster "
        f"start); output in {output}"
    )
    if valid + invalid != len(messages):
        print(f"error: valid + invalid = {valid + invalid} != {len(messages)} raw", file=sys.stderr)
        return 1
    return 0


# ---- command line ---------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m flink_jobs.validation_job",
        description="PyFlink stream validation: events.raw -> events.validated | events.invalid "
        "+ session features (rules imported from easymlops.schema). Settings from EASYMLOPS_*.",
    )
    modes = parser.add_subparsers(dest="mode", required=True)

    kafka = modes.add_parser("kafka", help="production: Kafka in, exactly-once Kafka + Redis out")
    kafka.add_argument("--group-id", default=DEFAULT_GROUP_ID, help="consumer group of the source")
    kafka.add_argument(
        "--transactional-id-prefix",
        default=DEFAULT_TRANSACTIONAL_ID_PREFIX,
        help="prefix of the sinks' transactional ids (keep it stable across restarts)",
    )
    kafka.add_argument("--checkpoint-interval-ms", type=int, default=10_000)
    kafka.add_argument("--checkpoint-dir", help="durable checkpoint URI (e.g. s3://bucket/ckpt)")
    kafka.add_argument("--transaction-timeout-ms", type=int, default=600_000)
    kafka.add_argument("--parallelism", type=int, default=1)
    kafka.add_argument(
        "--jar", action="append", default=[], help="extra jar (path or URL), e.g. the connector"
    )
    kafka.add_argument(
        "--no-session-features",
        dest="session_features",
        action="store_false",
        help="do not write feat:session:* hashes to Redis",
    )

    bounded = modes.add_parser("bounded", help="tests/replays: a JSON-lines file in, files out")
    bounded.add_argument("--input", required=True, help="JSON-lines file, one raw message a line")
    bounded.add_argument("--output", required=True, help="directory for valid/ invalid/ sessions/")
    bounded.add_argument("--parallelism", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.mode == "kafka":
        return run_kafka(args)
    return run_bounded(args)


if __name__ == "__main__":
    # Run the functions from the importable module, not from __main__: PyFlink pickles them (and
    # the keyed state) by reference then, and its Python workers import flink_jobs.validation_job.
    from flink_jobs import validation_job

    sys.exit(validation_job.main())
