"""Silver in bounded memory: build_silver works one event date at a time, each date built from
that date's bronze rows only, with the same result as building the whole table at once; and
importing the lake loads none of its heavy libraries (the Dagster definitions import it)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from datetime import date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from deltalake import write_deltalake

from easymlops import lake
from easymlops.settings import Settings

DAYS = [date(2024, 3, 1), date(2024, 3, 2), date(2024, 3, 3)]


def event(n: int, day: date, session: str, minute: int) -> dict[str, object]:
    return {
        "event_id": f"e{n}",
        "event_time": datetime.combine(day, datetime.min.time()) + timedelta(minutes=minute),
        "event_type": "view",
        "product_id": n,
        "category_id": 1,
        "category_code": None,
        "brand": None,
        "price": float(n),
        "user_id": 7,
        "user_session": session,
    }


def land(table: str, rows: list[dict[str, object]], landing: int) -> None:
    """One landing (one Delta append), with the Kafka columns as land_topic writes them."""
    frame = pl.DataFrame(rows, schema=lake.EVENT_COLUMNS).with_columns(
        pl.lit("topic-id").alias("kafka_topic_id"),
        pl.lit(0, dtype=pl.Int32).alias("kafka_partition"),
        (pl.int_range(pl.len(), dtype=pl.Int64) + landing * 1000).alias("kafka_offset"),
        pl.lit(datetime(2024, 3, 10) + timedelta(seconds=landing)).alias("landed_at"),
    )
    write_deltalake(table, frame.to_arrow(), mode="append")


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path, lake_uri=str(tmp_path / "lake"))
    table = lake.bronze_path(settings, "events")
    # One landing per date, then a landing replaying an event of the second date with another
    # price: the first landed copy wins.
    for i, day in enumerate(DAYS):
        land(table, [event(10 * i + k, day, f"s{k % 2}", 60 - k) for k in range(4)], i)
    replay = {**event(10, DAYS[1], "s0", 60), "price": -1.0}
    land(table, [replay], len(DAYS))
    return settings


def test_silver_is_built_one_date_at_a_time(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[date, set[date]]] = []
    date_parts = lake.silver_date_parts

    def spy(table_path: str, day: date, rows: int | None = None) -> Iterator[pl.DataFrame]:
        for part in date_parts(table_path, day, rows):
            built.append((day, set(part["event_time"].dt.date())))
            yield part

    monkeypatch.setattr(lake, "silver_date_parts", spy)
    result = lake.build_silver(settings)
    # Each date once, and each date's frame holds that date's events only: memory holds one
    # date's events, never the table's.
    assert built == [(day, {day}) for day in DAYS]
    assert result.rows == 12
    assert result.duplicates_removed == 1
    assert result.rows_by_date == {str(day): 4 for day in DAYS}


def test_a_date_over_the_limit_comes_in_parts_of_whole_sessions(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Bounded memory whatever the size of a day: a date of more bronze rows than
    SILVER_ROWS_PER_PART is built in parts, each holding whole sessions (and the copies of its
    events), and silver is the same as built whole."""
    table = lake.bronze_path(settings, "events")
    land(table, [event(100 + k, DAYS[1], f"t{k % 7}", k) for k in range(60)], len(DAYS) + 1)
    land(table, [event(100 + k, DAYS[1], f"t{k % 7}", k) for k in range(0, 60, 5)], len(DAYS) + 2)
    whole = lake.build_silver_date(table, DAYS[1])
    parts = list(lake.silver_date_parts(table, DAYS[1], rows=77, rows_per_part=20))
    assert len(parts) == 4
    sessions = [set(part["user_session"]) for part in parts]
    assert sum(map(len, sessions)) == len(set().union(*sessions)) == 9  # none in two parts
    assert pl.concat(parts).sort("event_id").equals(whole.sort("event_id"))
    assert whole.height == 64
    # build_silver writes the parts into one file per date: the same rows as built whole.
    monkeypatch.setattr(lake, "SILVER_ROWS_PER_PART", 20)
    lake.build_silver(settings)
    silver = lake.read_silver(settings, DAYS[1], DAYS[2])
    assert silver.drop("event_date").sort("event_id").equals(whole.sort("event_id"))


def test_an_id_shared_across_sessions_builds_the_date_whole(settings: Settings) -> None:
    """Two events sharing an id in different sessions may fall in different parts, where no
    part's deduplication sees both: such a date is built whole, and keeps the first landed."""
    table = lake.bronze_path(settings, "events")
    land(table, [event(11, DAYS[1], f"other-{k}", 5) for k in range(3)], len(DAYS) + 1)
    parts = list(lake.silver_date_parts(table, DAYS[1], rows=8, rows_per_part=2))
    assert len(parts) == 1
    assert parts[0]["event_id"].sort().to_list() == ["e10", "e11", "e12", "e13"]
    kept = parts[0].filter(pl.col("event_id") == "e11")
    assert kept["user_session"].to_list() == ["s1"]


def test_a_date_of_silver_is_deduplicated_and_sessionized_from_its_own_rows(
    settings: Settings,
) -> None:
    table = lake.bronze_path(settings, "events")
    part = lake.build_silver_date(table, DAYS[1])
    assert part.columns == [*lake.EVENT_COLUMNS, "session_seq"]
    assert sorted(part["event_id"]) == ["e10", "e11", "e12", "e13"]
    assert part.filter(pl.col("event_id") == "e10")["price"].to_list() == [10.0]  # first landed
    # Session order (user_session, event_time), session_seq counting from 0 in each session.
    assert part.select("user_session", "session_seq").rows() == [
        ("s0", 0),
        ("s0", 1),
        ("s1", 0),
        ("s1", 1),
    ]
    assert part["event_time"].is_sorted() is False  # sorted by session first, not by time
    assert lake.build_silver_date(table, date(2024, 3, 9)).height == 0


@pytest.mark.parametrize(
    ("session", "minute"),
    [
        ("a9", 5),  # another session, sorting before the first landed copy's "s1"
        ("s1", 58),  # the same session, a minute earlier: sorts just before it
    ],
)
def test_two_events_sharing_an_id_keep_the_first_landed(
    settings: Settings, session: str, minute: int
) -> None:
    # Not a replay: the same id at another place in session order, landed later. The copies of
    # a replay share session, time and id and sit next to each other; these do not, and silver
    # must still hold the id once: the first landed (e11 of session s1 at minute 59).
    table = lake.bronze_path(settings, "events")
    land(table, [event(11, DAYS[1], session, minute)], len(DAYS) + 1)
    part = lake.build_silver_date(table, DAYS[1])
    assert part["event_id"].sort().to_list() == ["e10", "e11", "e12", "e13"]
    kept = part.filter(pl.col("event_id") == "e11")
    assert kept.select("user_session", pl.col("event_time").dt.minute()).rows() == [("s1", 59)]
    assert part.select("user_session", "session_seq").rows() == [
        ("s0", 0),
        ("s0", 1),
        ("s1", 0),
        ("s1", 1),
    ]


def test_silver_by_date_equals_silver_of_the_whole_table(settings: Settings) -> None:
    lake.build_silver(settings)
    silver = lake.read_silver(settings).sort("event_id")
    whole = (
        lake.read_bronze(lake.bronze_path(settings, "events"))
        .sort("landed_at", "kafka_partition", "kafka_offset")
        .unique(subset="event_id", keep="first", maintain_order=True)
        .select(list(lake.EVENT_COLUMNS))
        .sort("user_session", "event_time", "event_id")
        .with_columns(
            pl.int_range(pl.len())
            .over("user_session", pl.col("event_time").dt.date())
            .cast(pl.Int32)
            .alias("session_seq"),
            pl.col("event_time").dt.date().alias("event_date"),
        )
        .sort("event_id")
    )
    assert silver.select(whole.columns).equals(whole)
    # A window rebuilds its dates only, and leaves the others alone.
    result = lake.build_silver(settings, DAYS[1], DAYS[2])
    assert result.dates == [str(DAYS[1])]
    assert lake.read_silver(settings).height == 12


def test_importing_the_lake_loads_no_heavy_library() -> None:
    code = (
        "import sys, easymlops.lake as lake; "
        "print(sorted(m for m in ('polars', 'pyarrow', 'deltalake', 'confluent_kafka') "
        "if m in sys.modules)); "
        "print(list(lake.EVENT_COLUMNS)[:2], lake.DeltaTable.__name__, sorted(lake.DECODERS))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out == [
        "[]",
        "['event_id', 'event_time'] DeltaTable ['invalid', 'predictions', 'validated']",
    ]
