"""Lake layers: Kafka -> bronze (Delta, exactly-once by offset) -> silver (typed, deduplicated,
sessionized Parquet partitioned by event date, read by dbt)."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from datetime import time as dt_time
from typing import TYPE_CHECKING, Any, cast

from easymlops import s3

# polars, pyarrow, deltalake and confluent-kafka are imported by the functions that use them:
# the Dagster definitions import this module, and only the step processes need them. The
# column dicts below (and `DeltaTable`, `DECODERS`) are built on first access (`__getattr__`).
if TYPE_CHECKING:
    from collections.abc import Iterable
    from pathlib import Path

    import polars as pl
    from deltalake import DeltaTable

    from easymlops.schema import Event
    from easymlops.settings import Settings

    EVENT_COLUMNS: dict[str, pl.DataType]
    KAFKA_COLUMNS: dict[str, pl.DataType]
    DEAD_LETTER_COLUMNS: dict[str, pl.DataType]
    PREDICTION_COLUMNS: dict[str, pl.DataType]
    SILVER_COLUMNS: dict[str, pl.DataType]
    DECODERS: dict[str, Callable[[list[bytes]], pl.DataFrame]]


@functools.cache
def _columns() -> dict[str, dict[str, pl.DataType]]:
    """The column dicts by their public names (built once, on first use)."""
    import polars as pl

    columns: dict[str, dict[str, pl.DataType]] = {}
    # Typed columns of a validated event in the lake (event_time is naive UTC: DuckDB and dbt
    # read it as TIMESTAMP without a zone conversion).
    columns["EVENT_COLUMNS"] = {
        "event_id": pl.String(),
        "event_time": pl.Datetime("us"),
        "event_type": pl.String(),
        "product_id": pl.Int64(),
        "category_id": pl.Int64(),
        "category_code": pl.String(),
        "brand": pl.String(),
        "price": pl.Float64(),
        "user_id": pl.Int64(),
        "user_session": pl.String(),
    }
    columns["KAFKA_COLUMNS"] = {
        "kafka_topic_id": pl.String(),
        "kafka_partition": pl.Int32(),
        "kafka_offset": pl.Int64(),
        "landed_at": pl.Datetime("us"),
    }
    # The fields of schema.DeadLetter, in its order (a test holds them equal: decoding drops any
    # key missing here). Envelopes written before a field existed decode with nulls in it.
    columns["DEAD_LETTER_COLUMNS"] = {
        "payload": pl.String(),
        "payload_encoding": pl.String(),
        "payload_bytes": pl.Int64(),
        "payload_truncated": pl.Boolean(),
        "error_type": pl.String(),
        "error_message": pl.String(),
        "error_field": pl.String(),
        "source_topic": pl.String(),
        "source_partition": pl.Int64(),
        "source_offset": pl.Int64(),
        "received_at": pl.String(),
    }

    # A logged prediction (serving/prediction_log.py); `features` is the JSON object of the
    # feature values used, `cart_event_time` the request's event_time (null: scored at arrival,
    # `scored_at`).
    columns["PREDICTION_COLUMNS"] = {
        "request_id": pl.String(),
        "predicted_at": pl.Datetime("us"),
        "model_name": pl.String(),
        "model_version": pl.String(),
        "event_id": pl.String(),
        "cart_event_time": pl.Datetime("us"),
        "scored_at": pl.Datetime("us"),
        "user_id": pl.Int64(),
        "product_id": pl.Int64(),
        "user_session": pl.String(),
        "features": pl.String(),
        "probability": pl.Float64(),
    }
    columns["SILVER_COLUMNS"] = {
        **columns["EVENT_COLUMNS"],
        "session_seq": pl.Int32(),
        "event_date": pl.Date(),
    }
    return columns


def _decoders() -> dict[str, Callable[[list[bytes]], pl.DataFrame]]:
    return {
        "validated": _decode_validated,
        "invalid": _decode_dead_letters,
        "predictions": _decode_predictions,
    }


def __getattr__(name: str) -> Any:
    """The module's polars-typed constants and `DeltaTable`, built or imported on first use."""
    if name == "DeltaTable":
        from deltalake import DeltaTable

        return DeltaTable
    if name == "DECODERS":
        return _decoders()
    if name.endswith("_COLUMNS") and name in _columns():
        return _columns()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The lake root is a local directory or s3://bucket/prefix. Delta tables and Parquet files are
# read and written through URIs (deltalake and polars take S3 endpoint and credentials from the
# AWS_* variables); listing and deleting silver partitions goes through pyarrow's filesystems.


def bronze_path(settings: Settings, name: str) -> str:
    return f"{settings.lake}/bronze/{name}"


def silver_events_path(settings: Settings) -> str:
    """The silver events dataset: a local directory or an s3:// URI."""
    return f"{settings.lake}/silver/events"


def write_silver_parquet(lake: Path, events: Iterable[Event]) -> None:
    """Validated events as plain Parquet, a file per event date under `lake`/silver/events, the
    layout dbt's silver source reads: for tests and studies that build gold without landing
    through Kafka (the pipeline's silver is written by `build_silver`)."""
    import polars as pl

    frame = pl.DataFrame(
        [
            {**e.to_json_dict(), "event_time": e.event_time.astimezone(UTC).replace(tzinfo=None)}
            for e in events
        ],
        schema=_columns()["EVENT_COLUMNS"],
    )
    for (day,), part in frame.group_by(pl.col("event_time").dt.date(), maintain_order=True):
        directory = lake / "silver" / "events" / f"event_date={day}"
        directory.mkdir(parents=True)
        part.write_parquet(directory / "part-0.parquet")


@dataclass
class LandingResult:
    """What one landing run covered: offsets are [start, end) per partition."""

    topic: str
    rows: int = 0
    start_offsets: dict[int, int] = field(default_factory=dict)
    end_offsets: dict[int, int] = field(default_factory=dict)
    delta_version: int | None = None
    # Landed events per event date (validated events only): the silver partitions to rebuild.
    rows_by_date: dict[str, int] = field(default_factory=dict)


class TopicBehindLake(RuntimeError):
    """A topic partition ends before the offsets a bronze table already landed from the same
    incarnation (topic id) of it."""


def app_id(topic: str, topic_id: str, partition: int) -> str:
    """The Delta application-transaction id of one partition of one incarnation of a topic: a
    recreated topic (new topic id, offsets from 0 again) lands from 0 into the same table, and
    the table keeps the history of the incarnations before it."""
    return f"{topic}/{topic_id}:{partition}"


def landed_offsets(
    table: str | DeltaTable, topic: str, topic_id: str, parts: list[int]
) -> dict[int, int]:
    """Next offset to land per partition, read from the Delta log's application transactions
    (`app_id`), which are committed atomically with the data. `table`: a path or a snapshot."""
    from deltalake import DeltaTable

    if isinstance(table, str):
        if not DeltaTable.is_deltatable(table):
            return dict.fromkeys(parts, 0)
        table = DeltaTable(table)
    return {p: table.transaction_version(app_id(topic, topic_id, p)) or 0 for p in parts}


class ConcurrentLanding(RuntimeError):
    """Another landing of the same topic into the same table committed first."""


def next_offset(reached: int, position: int, end: int) -> int:
    """Where a partition's landing stands once the consumer's position moved to `position` with
    no record delivered (transaction markers and aborted records are skipped that way).

    Capped at `end`, the run's range: the position can be past records written after the run
    read its end offsets, which it skipped as out of range; committing the position would skip
    them forever."""
    return max(reached, min(position, end))


def _decode_validated(values: list[bytes]) -> pl.DataFrame:
    import polars as pl

    columns = _columns()["EVENT_COLUMNS"]
    frame = pl.read_ndjson(b"\n".join(values), schema={k: pl.String() for k in columns})
    return frame.with_columns(
        pl.col("event_time")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us")
        .alias("event_time"),
        *(pl.col(c).cast(t) for c, t in columns.items() if c not in ("event_time",)),
    )


def _decode_dead_letters(values: list[bytes]) -> pl.DataFrame:
    import polars as pl

    rows = [json.loads(v) for v in values]
    return pl.DataFrame(rows, schema=_columns()["DEAD_LETTER_COLUMNS"])


def _naive_utc(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value).astimezone(UTC).replace(tzinfo=None)


def _decode_predictions(values: list[bytes]) -> pl.DataFrame:
    import polars as pl

    rows = []
    for value in values:
        record = json.loads(value)
        rows.append(
            {
                **{name: record.get(name) for name in _columns()["PREDICTION_COLUMNS"]},
                "predicted_at": _naive_utc(record.get("predicted_at")),
                "cart_event_time": _naive_utc(record.get("event_time")),
                "scored_at": _naive_utc(record.get("scored_at")),
                "features": json.dumps(record.get("features") or {}, sort_keys=True),
            }
        )
    return pl.DataFrame(rows, schema=_columns()["PREDICTION_COLUMNS"])


def land_topic(
    settings: Settings,
    topic: str,
    table_path: str,
    kind: str,
    *,
    until: dict[int, int] | None = None,
    progress: Callable[[int], None] | None = None,
    idle_timeout: float = 5.0,
) -> LandingResult:
    """Append every record of `topic` not yet in the bronze table, up to the current end offsets
    or, given `until`, up to those offsets (capped at the current ends; a partition missing from
    `until` lands nothing).

    The range always starts where the table's log says, never where a caller thinks: a range
    already landed lands nothing, and a range starting past the landed offsets lands the gap too.

    Exactly-once: the range starts at the offsets recorded in the table's last commit and the new
    end offsets are committed in the same Delta transaction as the rows, so a crash before the
    commit lands nothing and a re-run lands nothing twice.

    Raises TopicBehindLake when the topic ends before offsets already landed (it was emptied or
    recreated): the table then belongs to another incarnation of the topic.
    """
    import polars as pl
    from confluent_kafka import Consumer, TopicPartition
    from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
    from deltalake.exceptions import CommitFailedError

    from easymlops.kafka import coordinates, end_offsets, partitions, topic_id

    decode = _decoders()[kind]
    parts = partitions(settings, topic)
    incarnation = topic_id(settings, topic)
    # The snapshot the start offsets come from is also the one the commit is checked against:
    # if another landing committed offsets of this topic meanwhile, Delta refuses this commit
    # ("concurrent transaction") instead of appending the same records twice.
    snapshot = DeltaTable(table_path) if DeltaTable.is_deltatable(table_path) else None
    starts = landed_offsets(snapshot or table_path, topic, incarnation, parts)
    ends = end_offsets(settings, topic)
    behind = {p: (starts[p], ends.get(p, 0)) for p in parts if ends.get(p, 0) < starts[p]}
    if behind:
        # Same topic id, fewer records: the broker lost records it had acknowledged. Landing
        # nothing would look fine and later skip the records written below the landed offsets.
        raise TopicBehindLake(
            f"topic {topic!r} (id {incarnation}) is behind the bronze table {table_path}: "
            + "; ".join(
                f"partition {p} was landed up to offset {landed} but now ends at offset {end}"
                for p, (landed, end) in sorted(behind.items())
            )
            + ". The broker lost acknowledged records of this topic (a recreated topic would "
            "have a new id and land from offset 0 on its own). Nothing was landed: check the "
            "broker's storage before landing again."
        )
    result = LandingResult(topic=topic, start_offsets=starts, end_offsets=dict(starts))
    stops = {
        p: ends.get(p, 0) if until is None else min(ends.get(p, 0), until.get(p, starts[p]))
        for p in parts
    }
    todo = {p: stops[p] for p in parts if stops[p] > starts[p]}
    if not todo:
        return result

    consumer = Consumer(
        {
            "bootstrap.servers": settings.bootstrap_servers,
            "group.id": f"easymlops-lake-{kind}",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    values: list[bytes] = []
    meta_partition: list[int] = []
    meta_offset: list[int] = []
    reached: dict[int, int] = {p: starts[p] for p in todo}
    traces: dict[bytes, int] = {}  # records per upstream traceparent (the validator's spans)
    started_ns = time.time_ns()
    try:
        consumer.assign([TopicPartition(topic, p, starts[p]) for p in todo])
        last_message = time.monotonic()
        while any(reached[p] < todo[p] for p in todo):
            messages = consumer.consume(10_000, timeout=0.5)
            if not messages:
                # Control records of transactions never reach us: read the position instead.
                for tp in consumer.position([TopicPartition(topic, p) for p in todo]):
                    if tp.offset >= 0:
                        p = tp.partition
                        reached[p] = next_offset(reached[p], tp.offset, todo[p])
                if time.monotonic() - last_message > idle_timeout:
                    break
                continue
            last_message = time.monotonic()
            for message in messages:
                if message.error() is not None:
                    raise RuntimeError(f"reading {topic}: {message.error()}")
                _, part, offset = coordinates(message)
                if offset >= todo[part]:
                    continue  # beyond this run's range: the next run lands it
                values.append(message.value() or b"")
                meta_partition.append(part)
                meta_offset.append(offset)
                reached[part] = offset + 1
                # A consumed record's headers are (name, value) pairs (the stub also allows the
                # dict a producer may be given).
                for name, header in cast(list[tuple[str, bytes | None]], message.headers() or []):
                    if name == "traceparent" and header is not None:
                        traces[header] = traces.get(header, 0) + 1
            if progress:
                progress(len(values))
    finally:
        consumer.close()

    frame = decode(values) if values else pl.DataFrame(schema={**_empty_schema(kind)})
    landed_at = datetime.now(UTC).replace(tzinfo=None)
    frame = frame.with_columns(
        pl.lit(incarnation, dtype=pl.String).alias("kafka_topic_id"),
        pl.Series("kafka_partition", meta_partition, dtype=pl.Int32),
        pl.Series("kafka_offset", meta_offset, dtype=pl.Int64),
        pl.lit(landed_at, dtype=pl.Datetime("us")).alias("landed_at"),
    )
    new_offsets = {p: max(reached[p], starts[p]) for p in todo}
    # On S3 the refusal below rests on the store: deltalake 1.x writes each commit file with a
    # conditional PUT (If-None-Match: *), so of two writers of the same version one gets "already
    # exists" and goes through the conflict check instead of overwriting the other's commit.
    # SeaweedFS and AWS S3 honour it (tests/test_s3_lake.py); deltalake 1.x has no DynamoDB
    # locking provider any more and refuses to commit to a store without conditional PUT.
    try:
        write_deltalake(
            snapshot if snapshot is not None else table_path,
            frame.to_arrow(),
            mode="append",
            # Columns added over time (dead-letter payload_bytes/payload_truncated,
            # kafka_topic_id) join a table landed before them; the frame's columns come from
            # the fixed dicts above.
            schema_mode="merge",
            commit_properties=CommitProperties(
                app_transactions=[
                    Transaction(app_id(topic, incarnation, p), o) for p, o in new_offsets.items()
                ],
                custom_metadata={"easymlops.topic": topic},
            ),
        )
    except CommitFailedError as exc:
        raise ConcurrentLanding(
            f"another landing of {topic!r} into {table_path} committed while this one ran "
            f"({exc}); nothing of this run was committed: run it again to land what is left"
        ) from exc
    result.rows = frame.height
    if "event_time" in frame.columns:
        result.rows_by_date = dict(
            sorted(frame.group_by(pl.col("event_time").dt.date().cast(pl.String)).len().iter_rows())
        )
    result.end_offsets = {**starts, **new_offsets}
    result.delta_version = DeltaTable(table_path).version()
    _continue_traces(traces, started_ns, topic, table_path, result.delta_version)
    return result


def _continue_traces(
    traces: dict[bytes, int], started_ns: int, topic: str, table_path: str, version: int
) -> None:
    """One span per upstream trace among the landed records, child of the validator's span
    whose traceparent they carry, from the landing's start to its commit."""
    if not traces:
        return
    from easymlops import telemetry

    tracer = telemetry.tracer("easymlops.lake")
    for header, count in traces.items():
        span = tracer.start_span(
            "land",
            context=telemetry.continued_from(header),
            start_time=started_ns,
            attributes={
                "messaging.source.name": topic,
                "messaging.batch.message_count": count,
                "easymlops.lake.table": table_path,
                "easymlops.lake.delta_version": version,
            },
        )
        span.end()


def _empty_schema(kind: str) -> dict[str, pl.DataType]:
    return dict(
        {
            "validated": _columns()["EVENT_COLUMNS"],
            "invalid": _columns()["DEAD_LETTER_COLUMNS"],
        }.get(kind, _columns()["PREDICTION_COLUMNS"])
    )


def read_bronze(table_path: str) -> pl.DataFrame:
    import polars as pl
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(table_path):
        return pl.DataFrame(schema={**_columns()["EVENT_COLUMNS"], **_columns()["KAFKA_COLUMNS"]})
    return pl.read_delta(table_path)


def _scan_bronze_window(table_path: str, start: date | None, end: date | None) -> pl.LazyFrame:
    """A lazy scan of the bronze rows whose event_time falls on a date in [start, end): the
    bounds prune the Delta files by their statistics and the Parquet row groups by theirs, so
    only files holding events of those dates are read."""
    import polars as pl

    scan = pl.scan_delta(table_path)
    if start is not None:
        scan = scan.filter(pl.col("event_time") >= datetime.combine(start, dt_time()))
    if end is not None:
        scan = scan.filter(pl.col("event_time") < datetime.combine(end, dt_time()))
    return scan


def read_bronze_window(table_path: str, start: date | None, end: date | None) -> pl.DataFrame:
    """Bronze rows whose event_time falls on a date in [start, end) (all rows without bounds).
    The filter is pushed down to the Parquet statistics of the Delta files."""
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(table_path):
        return read_bronze(table_path)
    return _scan_bronze_window(table_path, start, end).collect()


def bronze_date_range(settings: Settings) -> tuple[date, date] | None:
    """First and last event date in bronze, or None when it holds no event."""
    import polars as pl
    from deltalake import DeltaTable

    path = bronze_path(settings, "events")
    if not DeltaTable.is_deltatable(path):
        return None
    bounds = (
        pl.scan_delta(path)
        .select(
            pl.col("event_time").min().dt.date().alias("first"),
            pl.col("event_time").max().dt.date().alias("last"),
        )
        .collect()
    )
    first, last = bounds.row(0)
    return None if first is None else (first, last)


def bronze_rows_by_date(table_path: str, start: date | None, end: date | None) -> dict[date, int]:
    """Bronze rows (copies included) per event date in [start, end), from the event_time column
    alone, in a streaming aggregation: the dates silver has to build, one at a time."""
    import polars as pl
    from deltalake import DeltaTable

    if not DeltaTable.is_deltatable(table_path):
        return {}
    counts = (
        _scan_bronze_window(table_path, start, end)
        .group_by(pl.col("event_time").dt.date().alias("event_date"))
        .len()
        .collect(engine="streaming")
    )
    return dict(sorted(counts.iter_rows()))


@dataclass
class SilverResult:
    rows: int
    duplicates_removed: int
    dates: list[str]
    rows_by_date: dict[str, int] = field(default_factory=dict)


# What silver reads of bronze: the event and the columns that order its copies.
_LANDING_ORDER = ("landed_at", "kafka_partition", "kafka_offset")


# The most bronze rows of one date that silver sorts in memory at once (~1.5 GB of peak here). A
# larger date is built in parts, split by a hash of user_session, so silver's memory stays the
# same whatever the size of a day (issue 15: a fixed budget at 40M events).
SILVER_ROWS_PER_PART = 2_000_000


def build_silver_date(table_path: str, day: date) -> pl.DataFrame:
    """The silver rows of one event date, in one frame (see `silver_date_parts`)."""
    import polars as pl

    return pl.concat(list(silver_date_parts(table_path, day)))


def silver_date_parts(
    table_path: str, day: date, rows: int | None = None, rows_per_part: int | None = None
) -> Iterator[pl.DataFrame]:
    """The silver rows of one event date, in parts: bronze's rows of that date only (the Delta
    files and row groups of other dates are skipped), deduplicated by event_id (first landed
    wins), in session order with `session_seq`, the position of the event among its session's
    events of that date.

    A date of more than `rows_per_part` bronze rows (`rows`: how many it holds, when the caller
    knows) comes in several parts, each the sessions whose hash falls in it: a session is in
    one part, and so are the copies of a replayed event (they share its session), so each part
    is deduplicated and numbered on its own. Events that share an id but not their session or
    time are not a replay; when the date holds any, it is built whole, in memory (rare: a
    producer reusing ids)."""
    import polars as pl

    events = list(_columns()["EVENT_COLUMNS"])
    scan = _scan_bronze_window(table_path, day, day + timedelta(days=1)).select(
        *events, *_LANDING_ORDER
    )
    limit = rows_per_part or SILVER_ROWS_PER_PART
    parts = 1 if rows is None else -(-rows // limit)
    if parts > 1:
        # Copies of an event share session, time and id: as many distinct (session, time, id)
        # as distinct ids means no id is left twice after each part's deduplication. Both are
        # counted as 64-bit hashes in a streaming pass; a collision mostly makes them differ
        # (then the date is built whole); hiding a shared id would take a collision of exactly
        # the missing count, and each part's own check below still sees ids shared inside it.
        counts = scan.select(
            pl.struct("user_session", "event_time", "event_id").hash().n_unique().alias("copies"),
            pl.col("event_id").hash().n_unique().alias("ids"),
        ).collect(engine="streaming")
        if counts["copies"].item() != counts["ids"].item():
            parts = 1
    for part in range(parts):
        selected = scan
        if parts > 1:
            selected = scan.filter(pl.col("user_session").hash(seed=7) % parts == part)
        # The streaming engine reads the date's rows in batches (~3x faster than the in-memory
        # engine's scan of the same files here, and it holds only what passes the filter).
        bronze = selected.collect(engine="streaming")
        # One sort does both jobs: the copies of an event share its session, time and id, so in
        # session order with the landing order last they sit next to each other, the first
        # landed one first. ~2x faster than sorting by landing order, deduplicating by hash,
        # then sorting by session (1.6-1.8 s against 3.2-4.4 s a date of 1.4M events here).
        deduplicated = _session_order_first_landed(bronze, events)
        # Ids left twice are copies that differ in session or time: not a replay, but two
        # events sharing an id. The hash count is a fast check (0.1 s a date); in that rare
        # case (or a hash collision) the exact deduplication by event_id alone decides.
        unique_ids = deduplicated.select(pl.col("event_id").hash().n_unique()).item()
        if unique_ids != deduplicated.height:
            deduplicated = _session_order_first_landed(_first_landed_by_event_id(bronze), events)
        del bronze
        yield deduplicated


def _session_order_first_landed(bronze: pl.DataFrame, events: list[str]) -> pl.DataFrame:
    import polars as pl

    position = pl.int_range(pl.len(), dtype=pl.Int32)
    session_starts = (pl.col("user_session") != pl.col("user_session").shift(1)).fill_null(True)
    # A copy of the row before: the same event. The same id alone is not enough: a later copy
    # in another session or at another time may sort just before the first landed one.
    same_as_previous = [
        pl.col(name) == pl.col(name).shift(1) for name in ("user_session", "event_time", "event_id")
    ]
    return (
        bronze.lazy()
        .sort("user_session", "event_time", "event_id", *_LANDING_ORDER)
        .filter(~pl.all_horizontal(same_as_previous).fill_null(False))
        .select(events)
        # The position in the frame minus that of the session's first row (the frame is in
        # session order): cheaper than a window over the session (~0.45 s a date).
        .with_columns(
            (position - pl.when(session_starts).then(position).forward_fill()).alias("session_seq")
        )
        .collect()
    )


def _first_landed_by_event_id(bronze: pl.DataFrame) -> pl.DataFrame:
    import polars as pl

    return bronze.sort(*_LANDING_ORDER).filter(pl.col("event_id").is_first_distinct())


def build_silver(
    settings: Settings, start: date | None = None, end: date | None = None
) -> SilverResult:
    """Rebuild the silver partitions of the event dates in [start, end) (every date without
    bounds) from bronze: typed, deduplicated by event_id (first landed wins), with the position
    of each event among its session's events of that date (`session_seq`; a session crossing
    midnight starts again at 0, so a partition never depends on another), one Parquet file per
    event date.

    One date at a time (`silver_date_parts`): copies of an event share its event_time, so
    deduplicating inside a date is deduplicating globally, and memory holds one date's events
    (a part of them for a date over SILVER_ROWS_PER_PART rows), never the table's.

    Overwrites: a reader never sees a partial partition (see below); a date of the window with
    no event left in bronze is removed.
    Rebuilding a window twice gives the same files (idempotent).
    """
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq

    table_path = bronze_path(settings, "events")
    fs, root = s3.filesystem(silver_events_path(settings))
    bronze_rows = bronze_rows_by_date(table_path, start, end)
    rows_by_date: dict[str, int] = {}
    for event_date, rows in bronze_rows.items():
        day = str(event_date)
        directory = f"{root}/event_date={day}"
        final = f"{directory}/part-0.parquet"
        # Readers never see a partial partition: on S3 an object appears whole when its PUT (or
        # multipart upload) completes; on a local disk the file is written under a temporary
        # name and renamed.
        target = final
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(directory, recursive=True)
            target = f"{directory}/.part-0.parquet.tmp"
        written = 0
        with fs.open_output_stream(target) as out:
            # One file per date, its parts as row groups: a reader sees the whole date or the
            # date before, and memory holds one part.
            writer: pq.ParquetWriter | None = None
            for part in silver_date_parts(table_path, event_date, rows):
                table = part.to_arrow()
                writer = writer or pq.ParquetWriter(out, table.schema, compression="zstd")
                # row groups of 512² rows, polars' default: DuckDB reads row groups in parallel
                writer.write_table(table, row_group_size=512**2)
                written += part.height
                del part, table
            if writer is not None:
                writer.close()
        if target != final:
            fs.move(target, final)
        rows_by_date[day] = written
    # Dates of the window no longer in bronze (e.g. after a lake reset) must not linger.
    for stale in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        day = stale.base_name.removeprefix("event_date=")
        if (
            stale.type == pafs.FileType.Directory
            and day not in rows_by_date
            and _in_window(day, start, end)
        ):
            fs.delete_dir(stale.path)
    silver_rows = sum(rows_by_date.values())
    return SilverResult(
        rows=silver_rows,
        duplicates_removed=sum(bronze_rows.values()) - silver_rows,
        dates=sorted(rows_by_date),
        rows_by_date=dict(sorted(rows_by_date.items())),
    )


def _in_window(day: str, start: date | None, end: date | None) -> bool:
    try:
        value = date.fromisoformat(day)
    except ValueError:
        return False
    return (start is None or value >= start) and (end is None or value < end)


def read_silver(
    settings: Settings, start: date | None = None, end: date | None = None
) -> pl.DataFrame:
    """Silver events of the dates in [start, end) (every date without bounds); only the
    partitions of those dates are read."""
    import polars as pl
    import pyarrow.fs as pafs

    uri = silver_events_path(settings)
    fs, root = s3.filesystem(uri)
    files = sorted(
        f"{uri}/{info.path.removeprefix(root).lstrip('/')}"
        for info in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True, recursive=True))
        if info.type == pafs.FileType.File
        and info.base_name.endswith(".parquet")
        and info.path.removeprefix(root).count("/") == 2  # event_date=YYYY-MM-DD/<file>
        and _in_window(info.path.split("/")[-2].removeprefix("event_date="), start, end)
    )
    if not files:
        return pl.DataFrame(schema=_columns()["SILVER_COLUMNS"])
    return pl.read_parquet(files, hive_partitioning=True)
