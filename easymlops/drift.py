"""Feature and score drift: the population stability index (PSI) of every feature and of the
score, and the two-sample Kolmogorov-Smirnov statistic for continuous ones.

numpy and scipy only. Evidently was weighed and left out: it would pull in its own pandas,
plotly and nltk stack (over 100 MB) for two statistics of a few lines each, and its reports are
HTML pages, where Dagster shows metadata.

PSI = sum over bins of (current% - reference%) * ln(current% / reference%), bins = deciles of the
reference (fewer when it has fewer distinct values), plus one bin for missing values: a feature
that starts to go missing has drifted too. Proportions are floored at 1e-4 so that an empty bin
gives a large, finite PSI. Usual reading: < 0.1 stable, 0.1-0.25 moderate, > 0.25 large.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from easymlops.settings import Settings

BINS = 10
_FLOOR = 1e-4
# Features with few distinct values (counts) get no KS: its statistic on ties says little.
_MIN_DISTINCT_FOR_KS = 20


@dataclass(frozen=True)
class Drift:
    name: str
    psi: float
    ks: float | None  # KS statistic (None for discrete features)
    ks_pvalue: float | None
    reference_rows: int
    current_rows: int
    reference_missing: float  # share of missing values
    current_missing: float
    reference_mean: float | None
    current_mean: float | None

    def as_dict(self) -> dict[str, Any]:
        def r(x: float | None) -> float | None:
            return None if x is None or not math.isfinite(x) else round(x, 4)

        return {
            "feature": self.name,
            "psi": r(self.psi),
            "ks": r(self.ks),
            "ks_pvalue": r(self.ks_pvalue),
            "reference_mean": r(self.reference_mean),
            "current_mean": r(self.current_mean),
            "reference_missing": r(self.reference_missing),
            "current_missing": r(self.current_missing),
        }


def _bin_edges(reference: np.ndarray) -> np.ndarray:
    edges = np.unique(np.quantile(reference, np.linspace(0, 1, BINS + 1)[1:-1]))
    return edges


def psi(reference: np.ndarray, current: np.ndarray) -> float:
    """PSI of `current` against `reference` (NaN = missing; module docstring)."""
    ref_present, cur_present = reference[~np.isnan(reference)], current[~np.isnan(current)]
    edges = _bin_edges(ref_present) if ref_present.size else np.array([])

    def shares(values: np.ndarray, present: np.ndarray) -> np.ndarray:
        counts = np.bincount(
            np.searchsorted(edges, present, side="right"), minlength=len(edges) + 1
        )
        missing = values.size - present.size
        total = max(values.size, 1)
        return np.maximum(np.append(counts, missing) / total, _FLOOR)

    ref, cur = shares(reference, ref_present), shares(current, cur_present)
    return float(np.sum((cur - ref) * np.log(cur / ref)))


def compare(reference: pl.DataFrame, current: pl.DataFrame, columns: Sequence[str]) -> list[Drift]:
    """Drift of each column of `current` against `reference`, largest PSI first."""
    from scipy.stats import ks_2samp

    results = []
    for name in columns:
        ref = reference[name].cast(pl.Float64).fill_null(math.nan).to_numpy()
        cur = current[name].cast(pl.Float64).fill_null(math.nan).to_numpy()
        ref_present, cur_present = ref[~np.isnan(ref)], cur[~np.isnan(cur)]
        ks = pvalue = None
        continuous = np.unique(ref_present).size >= _MIN_DISTINCT_FOR_KS
        if continuous and ref_present.size and cur_present.size:
            test = ks_2samp(ref_present, cur_present)
            ks, pvalue = float(test.statistic), float(test.pvalue)
        results.append(
            Drift(
                name=name,
                psi=psi(ref, cur),
                ks=ks,
                ks_pvalue=pvalue,
                reference_rows=ref.size,
                current_rows=cur.size,
                reference_missing=1 - ref_present.size / max(ref.size, 1),
                current_missing=1 - cur_present.size / max(cur.size, 1),
                reference_mean=float(ref_present.mean()) if ref_present.size else None,
                current_mean=float(cur_present.mean()) if cur_present.size else None,
            )
        )
    return sorted(results, key=lambda d: d.psi, reverse=True)


def markdown_table(drifts: Sequence[Drift], warn: float, fail: float) -> str:
    lines = [
        "| feature | PSI | KS | mean (reference -> current) | missing (reference -> current) |",
        "|---|---:|---:|---|---|",
    ]
    for d in drifts:
        flag = " **FAIL**" if d.psi >= fail else " *warn*" if d.psi >= warn else ""
        ks = "" if d.ks is None else f"{d.ks:.3f}"
        mean = (
            f"{d.reference_mean:.4g} -> {d.current_mean:.4g}"
            if d.reference_mean is not None and d.current_mean is not None
            else ""
        )
        lines.append(
            f"| {d.name}{flag} | {d.psi:.3f} | {ks} | {mean} | "
            f"{d.reference_missing:.0%} -> {d.current_missing:.0%} |"
        )
    return "\n".join(lines)


def psi_figure(drifts: Sequence[Drift], warn: float, fail: float) -> Any:
    """A horizontal bar chart of PSI per feature with the two thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ordered = sorted(drifts, key=lambda d: d.psi)
    fig, ax = plt.subplots(figsize=(7, 0.3 * len(ordered) + 1.2))
    colors = [
        "#c0392b" if d.psi >= fail else "#e67e22" if d.psi >= warn else "#2e86c1" for d in ordered
    ]
    ax.barh([d.name for d in ordered], [d.psi for d in ordered], color=colors)
    ax.axvline(warn, color="#e67e22", linestyle="--", linewidth=1, label=f"warn {warn}")
    ax.axvline(fail, color="#c0392b", linestyle="--", linewidth=1, label=f"fail {fail}")
    ax.set_xscale("symlog", linthresh=0.1)
    ax.set_xlabel("PSI (current vs training reference)")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


# -- the reference of a model version -------------------------------------------------------------
# Written when a version is trained: its held-out rows' features and its scores of them, the
# most recent mature data it saw. A day is compared with the reference of the version that
# scored it, not with whatever the warehouse holds by then.


def reference_path(settings: Settings, version: str) -> str:
    return f"{settings.lake}/monitoring/reference/{settings.model_name}/v{version}.parquet"


def write_reference(settings: Settings, version: str, frame: pl.DataFrame) -> str:
    path = reference_path(settings, version)
    if not path.startswith("s3://"):
        from pathlib import Path

        Path(path).parent.mkdir(parents=True, exist_ok=True)
    frame.write_parquet(path)
    return path


def read_reference(settings: Settings, version: str) -> pl.DataFrame:
    path = reference_path(settings, version)
    try:
        return pl.read_parquet(path)
    except FileNotFoundError as exc:
        raise FileNotFoundError(
            f"{settings.model_name} version {version} has no drift reference at {path} (it is "
            "written when purchase_model trains a version): retrain to get one"
        ) from exc
