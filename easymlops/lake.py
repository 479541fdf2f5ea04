"""Lake layers: Kafka -> bronze (Delta, exactly-once by offset) -> silver (typed, deduplicated,
sessionized Parquet partitioned by event date, read by dbt)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from datetime import time as dt_time

import polars as pl
import pyarrow.fs as pafs
from confluent_kafka import Consumer, TopicPartition
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError

from easymlops import s3
from easymlops.kafka import coordinates, end_offsets, partitions, topic_id
from easymlops.settings import Settings

# Typed columns of a validated event in the lake (event_time is naive UTC: DuckDB and dbt read
# it as TIMESTAMP without a zone conversion).
EVENT_COLUMNS: dict[str, pl.DataType] = {
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
KAFKA_COLUMNS: dict[str, pl.DataType] = {
    "kafka_topic_id": pl.String(),
    "kafka_partition": pl.Int32(),
    "kafka_offset": pl.Int64(),
    "landed_at": pl.Datetime("us"),
}
# The fields of schema.DeadLetter, in its order (a test holds them equal: decoding drops any key
# missing here). Envelopes written before a field existed decode with nulls in it.
DEAD_LETTER_COLUMNS: dict[str, pl.DataType] = {
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

# A logged prediction (serving/prediction_log.py); `features` is the JSON object of the feature
# values used, `cart_event_time` the request's event_time (null: scored at arrival, `scored_at`).
PREDICTION_COLUMNS: dict[str, pl.DataType] = {
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


# The lake root is a local directory or s3://bucket/prefix. Delta tables and Parquet files are
# read and written through URIs (deltalake and polars take S3 endpoint and credentials from the
# AWS_* variables); listing and deleting silver partitions goes through pyarrow's filesystems.


def bronze_path(settings: Settings, name: str) -> str:
    return f"{settings.lake}/bronze/{name}"


def silver_events_path(settings: Settings) -> str:
    """The silver events dataset: a local directory or an s3:// URI."""
    return f"{settings.lake}/silver/events"


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
    frame = pl.read_ndjson(b"\n".join(values), schema={k: pl.String() for k in EVENT_COLUMNS})
    return frame.with_columns(
        pl.col("event_time")
        .str.to_datetime("%Y-%m-%dT%H:%M:%S%.fZ", time_unit="us")
        .alias("event_time"),
        *(pl.col(c).cast(t) for c, t in EVENT_COLUMNS.items() if c not in ("event_time",)),
    )


def _decode_dead_letters(values: list[bytes]) -> pl.DataFrame:
    rows = [json.loads(v) for v in values]
    return pl.DataFrame(rows, schema=DEAD_LETTER_COLUMNS)


def _naive_utc(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value).astimezone(UTC).replace(tzinfo=None)


def _decode_predictions(values: list[bytes]) -> pl.DataFrame:
    rows = []
    for value in values:
        record = json.loads(value)
        rows.append(
            {
                **{name: record.get(name) for name in PREDICTION_COLUMNS},
                "predicted_at": _naive_utc(record.get("predicted_at")),
                "cart_event_time": _naive_utc(record.get("event_time")),
                "scored_at": _naive_utc(record.get("scored_at")),
                "features": json.dumps(record.get("features") or {}, sort_keys=True),
            }
        )
    return pl.DataFrame(rows, schema=PREDICTION_COLUMNS)


DECODERS: dict[str, Callable[[list[bytes]], pl.DataFrame]] = {
    "validated": _decode_validated,
    "invalid": _decode_dead_letters,
    "predictions": _decode_predictions,
}


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
    decode = DECODERS[kind]
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
    return result


def _empty_schema(kind: str) -> dict[str, pl.DataType]:
    return dict(
        {"validated": EVENT_COLUMNS, "invalid": DEAD_LETTER_COLUMNS}.get(kind, PREDICTION_COLUMNS)
    )


def read_bronze(table_path: str) -> pl.DataFrame:
    if not DeltaTable.is_deltatable(table_path):
        return pl.DataFrame(schema={**EVENT_COLUMNS, **KAFKA_COLUMNS})
    return pl.read_delta(table_path)


@dataclass
class SilverResult:
    rows: int
    duplicates_removed: int
    dates: list[str]
    rows_by_date: dict[str, int] = field(default_factory=dict)


def read_bronze_window(table_path: str, start: date | None, end: date | None) -> pl.DataFrame:
    """Bronze rows whose event_time falls on a date in [start, end) (all rows without bounds).
    The filter is pushed down to the Parquet statistics of the Delta files."""
    if not DeltaTable.is_deltatable(table_path):
        return read_bronze(table_path)
    scan = pl.scan_delta(table_path)
    if start is not None:
        scan = scan.filter(pl.col("event_time") >= datetime.combine(start, dt_time()))
    if end is not None:
        scan = scan.filter(pl.col("event_time") < datetime.combine(end, dt_time()))
    return scan.collect()


def bronze_date_range(settings: Settings) -> tuple[date, date] | None:
    """First and last event date in bronze, or None when it holds no event."""
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


def build_silver(
    settings: Settings, start: date | None = None, end: date | None = None
) -> SilverResult:
    """Rebuild the silver partitions of the event dates in [start, end) (every date without
    bounds) from bronze: typed, deduplicated by event_id (first landed wins), with the position
    of each event among its session's events of that date (`session_seq`; a session crossing
    midnight starts again at 0, so a partition never depends on another), one Parquet file per
    event date.

    Overwrites: a reader never sees a partial partition (see below); a date of the window with
    no event left in bronze is removed.
    Rebuilding a window twice gives the same files (idempotent).
    """
    bronze = read_bronze_window(bronze_path(settings, "events"), start, end)
    # Copies of an event share its event_time, so deduplicating inside a date window is
    # deduplicating globally.
    deduped = bronze.sort("landed_at", "kafka_partition", "kafka_offset").unique(
        subset="event_id", keep="first", maintain_order=True
    )
    silver = (
        deduped.select(list(EVENT_COLUMNS))
        .with_columns(pl.col("event_time").dt.date().alias("event_date"))
        .sort("user_session", "event_time", "event_id")
        .with_columns(
            pl.int_range(pl.len())
            .over("user_session", "event_date")
            .cast(pl.Int32)
            .alias("session_seq"),
        )
    )
    fs, root = s3.filesystem(silver_events_path(settings))
    rows_by_date: dict[str, int] = {}
    for (event_date,), part in silver.partition_by("event_date", as_dict=True).items():
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
        with fs.open_output_stream(target) as out:
            part.drop("event_date").write_parquet(out)
        if target != final:
            fs.move(target, final)
        rows_by_date[day] = part.height
    # Dates of the window no longer in bronze (e.g. after a lake reset) must not linger.
    for stale in fs.get_file_info(pafs.FileSelector(root, allow_not_found=True)):
        day = stale.base_name.removeprefix("event_date=")
        if (
            stale.type == pafs.FileType.Directory
            and day not in rows_by_date
            and _in_window(day, start, end)
        ):
            fs.delete_dir(stale.path)
    return SilverResult(
        rows=silver.height,
        duplicates_removed=bronze.height - deduped.height,
        dates=sorted(rows_by_date),
        rows_by_date=dict(sorted(rows_by_date.items())),
    )


def _in_window(day: str, start: date | None, end: date | None) -> bool:
    try:
        value = date.fromisoformat(day)
    except ValueError:
        return False
    return (start is None or value >= start) and (end is None or value < end)


SILVER_COLUMNS: dict[str, pl.DataType] = {
    **EVENT_COLUMNS,
    "session_seq": pl.Int32(),
    "event_date": pl.Date(),
}


def read_silver(
    settings: Settings, start: date | None = None, end: date | None = None
) -> pl.DataFrame:
    """Silver events of the dates in [start, end) (every date without bounds); only the
    partitions of those dates are read."""
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
        return pl.DataFrame(schema=SILVER_COLUMNS)
    return pl.read_parquet(files, hive_partitioning=True)
