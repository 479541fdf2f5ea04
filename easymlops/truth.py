"""The synthetic generator's ground truth: each generated cart's purchase probability, kept
beside the lake (`<home>/truth/*.parquet`, one file per produce run, keyed by `event_id`) and
never in the event stream, so no feature can read it.

Only evaluation reads it: training reports the oracle AUC (the true probabilities' AUC on the
model's held-out rows) and the model/oracle ratio, and the promotion gate's "implausibly good"
ceiling sits just above the oracle. Replayed real data has no truth; evaluation then says so.

Columns: `event_id`, `purchase_probability` (the oracle: P(purchase) given the user, product,
session and price, with the per-cart noise averaged out; see
`easymlops.generator.purchase_probability`), `drawn_probability` (that of the coin actually
flipped, noise included: an oracle no model can approach, recorded for transparency).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl

from easymlops.settings import Settings

COLUMNS = ("event_id", "purchase_probability", "drawn_probability")


def truth_dir(settings: Settings) -> Path:
    return settings.home_dir / "truth"


class TruthRecorder:
    """A `generator.TruthSink` that keeps what it receives until `write`."""

    def __init__(self) -> None:
        self.event_ids: list[str] = []
        self.probabilities: list[float] = []
        self.drawn: list[float] = []

    def __call__(self, event_id: str, probability: float, drawn_probability: float) -> None:
        self.event_ids.append(event_id)
        self.probabilities.append(probability)
        self.drawn.append(drawn_probability)

    def __len__(self) -> int:
        return len(self.event_ids)

    def write(self, settings: Settings, name: str) -> Path:
        """Write `<home>/truth/<name>.parquet` (replaced if it exists: the same produce run
        gives the same events and the same truth)."""
        folder = truth_dir(settings)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{name}.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pl.DataFrame(
            {
                "event_id": self.event_ids,
                "purchase_probability": self.probabilities,
                "drawn_probability": self.drawn,
            },
            schema={
                "event_id": pl.Utf8,
                "purchase_probability": pl.Float64,
                "drawn_probability": pl.Float64,
            },
        ).write_parquet(tmp)
        tmp.replace(path)
        return path


def load(settings: Settings, event_ids: Iterable[str]) -> pl.DataFrame:
    """The truth rows of `event_ids` (those known; none for replayed real data)."""
    files = sorted(truth_dir(settings).glob("*.parquet"))
    wanted = pl.DataFrame({"event_id": list(event_ids)}, schema={"event_id": pl.Utf8})
    if not files:
        return wanted.clear().with_columns(
            pl.lit(None, pl.Float64).alias("purchase_probability"),
            pl.lit(None, pl.Float64).alias("drawn_probability"),
        )
    truth = pl.scan_parquet(files).unique("event_id", keep="first")
    return wanted.lazy().join(truth, on="event_id", how="inner").collect()
