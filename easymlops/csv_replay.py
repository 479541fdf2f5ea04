"""Replay of the public Kaggle dataset "eCommerce behavior data from multi category store" (CSV).

The files are read as they are, streaming (csv module, one row at a time; `.gz` files are
decompressed on the fly), so monthly dumps of tens of GB are fine:

    event_time,event_type,product_id,category_id,category_code,brand,price,user_id,user_session
    2019-10-01 00:00:00 UTC,view,44600062,2103807459595387724,,shiseido,35.79,541312140,72d76...

Each data row becomes one JSON object whose keys are the header's column names and whose values
are the CSV strings untouched: numbers stay decimal strings and an empty field stays `""` (the
validator in `easymlops.schema` accepts decimal strings and treats an empty `category_code` /
`brand` as null, and rejects an empty required field). Nothing is fixed or dropped here, so every
row reaches the validator, which accepts it or rejects it with a reason:

- a row with fewer fields than the header keeps the fields it has (the missing trailing columns
  are absent, so the validator reports `missing_field`);
- a row with more fields keeps the header's columns and puts the surplus, in order, under the
  key `_extra_columns` (the validator ignores unknown keys, so such a row may still be valid);
- blank lines are skipped and counted; bytes that are not UTF-8 become U+FFFD.

The header is checked when `read_csv_events` / `read_csv_records` is called (not at the first
`next()`): a file without the nine columns raises `CsvFormatError` naming the missing ones.
`ReplayStats`, passed as `stats=`, counts rows as they are yielded.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CSV_COLUMNS: tuple[str, ...] = (
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
EXTRA_COLUMNS_KEY = "_extra_columns"


class CsvFormatError(ValueError):
    """The file is not in the dataset's CSV format (bad or missing header, unreadable CSV)."""


@dataclass(slots=True)
class ReplayStats:
    """What a replay has yielded so far."""

    rows: int = 0  # data rows yielded (each one message)
    short_rows: int = 0  # fewer fields than the header
    long_rows: int = 0  # more fields than the header
    blank_lines: int = 0  # skipped

    def as_dict(self) -> dict[str, int]:
        return {
            "rows": self.rows,
            "short_rows": self.short_rows,
            "long_rows": self.long_rows,
            "blank_lines": self.blank_lines,
        }


def _open(path: Path) -> IO[str]:
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return path.open("r", encoding="utf-8", errors="replace", newline="")


def read_header(path: str | Path) -> list[str]:
    """The file's column names, checked: raises `CsvFormatError` naming missing columns."""
    path = Path(path)
    with _open(path) as handle:
        try:
            header = next(csv.reader(handle), None)
        except csv.Error as exc:
            raise CsvFormatError(f"{path}: header is not readable CSV: {exc}") from None
    if not header:
        raise CsvFormatError(f"{path}: empty file, expected the header {','.join(CSV_COLUMNS)}")
    columns = [name.strip().lstrip("\ufeff") for name in header]
    missing = [name for name in CSV_COLUMNS if name not in columns]
    if missing:
        raise CsvFormatError(
            f"{path}: header is missing column(s) {', '.join(missing)}; "
            f"expected {','.join(CSV_COLUMNS)}, got {','.join(columns)[:300]}"
        )
    duplicated = sorted({name for name in columns if columns.count(name) > 1})
    if duplicated:
        raise CsvFormatError(f"{path}: header repeats column(s) {', '.join(duplicated)}")
    return columns


def read_csv_records(
    path: str | Path, *, stats: ReplayStats | None = None, limit: int | None = None
) -> Iterator[dict[str, Any]]:
    """Yield each data row of `path` as a dict of its CSV strings (see the module docstring);
    at most `limit` rows when given. The header is checked before this returns."""
    path = Path(path)
    columns = read_header(path)
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    return _records(path, columns, stats if stats is not None else ReplayStats(), limit)


def _records(
    path: Path, columns: list[str], stats: ReplayStats, limit: int | None
) -> Iterator[dict[str, Any]]:
    width = len(columns)
    with _open(path) as handle:
        reader = csv.reader(handle)
        next(reader)  # the header, checked by read_header
        while limit is None or stats.rows < limit:
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                raise CsvFormatError(f"{path}:{reader.line_num}: unreadable CSV: {exc}") from None
            if not row or (len(row) == 1 and not row[0].strip()):
                stats.blank_lines += 1
                continue
            record: dict[str, Any] = dict(zip(columns, row, strict=False))
            if len(row) < width:
                stats.short_rows += 1
            elif len(row) > width:
                stats.long_rows += 1
                record[EXTRA_COLUMNS_KEY] = row[width:]
            stats.rows += 1
            yield record


def read_csv_events(
    path: str | Path, *, stats: ReplayStats | None = None, limit: int | None = None
) -> Iterator[bytes]:
    """Yield each data row of `path` as a Kafka message value: the row's dict (see
    `read_csv_records`) as compact UTF-8 JSON. The header is checked before this returns."""
    records = read_csv_records(path, stats=stats, limit=limit)
    return _encode(records)


def _encode(records: Iterator[dict[str, Any]]) -> Iterator[bytes]:
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
    for record in records:
        yield encoder.encode(record).encode("utf-8")
