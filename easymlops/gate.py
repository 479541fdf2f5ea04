"""The promotion gate's statistics and decision, as pure functions of held-out scores.

Everything is measured on the same held-out rows (the mature carts of the test period): the
challenger, the price-only baseline and the current champion are all scored on them, and each
comparison is a *paired* bootstrap (the same resampled rows for both models), whose interval
of the AUC difference is far narrower than two separate AUC intervals.

A challenger is refused when
- it is too weak: the lower bound of the interval of AUC(challenger) - AUC(baseline) is not
  above `min_lift` (it does not measurably beat what the request alone tells);
- it is implausibly good: its AUC is above the ceiling, i.e. the oracle AUC (the generator's
  true probabilities on the same rows) plus `oracle_margin` where the truth is known, else
  `max_auc` (no honest model beats the oracle; a leak does);
- it is worse than the champion: the lower bound of the interval of AUC(challenger) -
  AUC(champion) is below -`margin` (a non-inferiority margin: a retrained model on fresher
  data is promoted unless it is measurably worse than the one serving).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

CONFIDENCE = 0.95


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        return asdict(self)

    def __str__(self) -> str:
        return f"{self.estimate:+.4f} [{self.low:+.4f}, {self.high:+.4f}]"


def _auc_rows(labels: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """AUC of each row of `scores` (shape (k, n)) against the matching row of `labels`, by the
    rank-sum formula with average ranks for ties (= sklearn's roc_auc_score). NaN for a row
    with a single class."""
    from scipy.stats import rankdata  # scipy.stats: ~1 s, only when a gate runs

    ranks = rankdata(scores, axis=1)
    positives = labels.sum(axis=1)
    negatives = labels.shape[1] - positives
    rank_sum = (ranks * labels).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def auc(labels: np.ndarray, scores: np.ndarray) -> float:
    return float(_auc_rows(labels[None, :].astype(float), scores[None, :])[0])


def bootstrap_indices(n: int, resamples: int, seed: int) -> np.ndarray:
    """(resamples, n) row indices drawn with replacement; the same for every comparison of one
    gate decision, so all its intervals are paired on the same resamples."""
    return np.random.default_rng(seed).integers(0, n, size=(resamples, n))


def auc_difference(
    labels: np.ndarray, a: np.ndarray, b: np.ndarray, indices: np.ndarray
) -> Interval:
    """AUC(a) - AUC(b) on the rows, with its paired percentile bootstrap interval."""
    y = labels.astype(float)
    estimate = auc(y, a) - auc(y, b)
    resampled_y = y[indices]
    diffs = _auc_rows(resampled_y, a[indices]) - _auc_rows(resampled_y, b[indices])
    diffs = diffs[np.isfinite(diffs)]
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(diffs, [alpha, 1 - alpha]) if len(diffs) else (np.nan, np.nan)
    return Interval(float(estimate), float(low), float(high))


def auc_interval(labels: np.ndarray, scores: np.ndarray, indices: np.ndarray) -> Interval:
    """AUC of `scores` with its percentile bootstrap interval."""
    y = labels.astype(float)
    values = _auc_rows(y[indices], scores[indices])
    values = values[np.isfinite(values)]
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(values, [alpha, 1 - alpha]) if len(values) else (np.nan, np.nan)
    return Interval(auc(y, scores), float(low), float(high))


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]
    challenger_auc: Interval
    lift_over_baseline: Interval
    ceiling: float
    ceiling_source: str  # "oracle" or "configured"
    oracle_auc: float | None = None
    champion_auc: float | None = None
    vs_champion: Interval | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def description(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "challenger may be promoted"


def decide(
    labels: np.ndarray,
    challenger: np.ndarray,
    baseline: np.ndarray,
    *,
    champion: np.ndarray | None,
    oracle: np.ndarray | None,
    min_lift: float,
    margin: float,
    oracle_margin: float,
    max_auc: float,
    resamples: int,
    seed: int = 0,
) -> GateDecision:
    """The gate's verdict for `challenger` scores on held-out rows with `labels`; `champion`
    and `oracle` are scores of the same rows or None (no champion yet; no truth known)."""
    if len(np.unique(labels)) < 2:
        raise ValueError(
            f"the held-out rows ({len(labels)}) hold a single class: no AUC can be measured"
        )
    indices = bootstrap_indices(len(labels), resamples, seed)
    challenger_auc = auc_interval(labels, challenger, indices)
    lift = auc_difference(labels, challenger, baseline, indices)
    reasons: list[str] = []
    if not lift.low > min_lift:
        reasons.append(
            f"too weak: AUC {challenger_auc.estimate:.4f} vs price-only baseline "
            f"{challenger_auc.estimate - lift.estimate:.4f}, lift {lift} does not clear "
            f"{min_lift:+.4f}"
        )
    oracle_auc = None
    if oracle is not None:
        oracle_auc = auc(labels.astype(float), oracle)
        ceiling, source = oracle_auc + oracle_margin, "oracle"
    else:
        ceiling, source = max_auc, "configured"
    if challenger_auc.estimate > ceiling:
        reasons.append(
            f"implausibly good: AUC {challenger_auc.estimate:.4f} is above "
            + (
                f"the oracle {oracle_auc:.4f} + {oracle_margin}"
                if oracle_auc is not None
                else f"the ceiling {max_auc}"
            )
            + ": look for label leakage"
        )
    decision = GateDecision(
        passed=False,
        reasons=reasons,
        challenger_auc=challenger_auc,
        lift_over_baseline=lift,
        ceiling=ceiling,
        ceiling_source=source,
        oracle_auc=oracle_auc,
    )
    if champion is not None:
        versus = auc_difference(labels, challenger, champion, indices)
        decision.vs_champion = versus
        decision.champion_auc = challenger_auc.estimate - versus.estimate
        if not versus.low >= -margin:
            reasons.append(
                f"worse than the champion: AUC {challenger_auc.estimate:.4f} vs "
                f"{decision.champion_auc:.4f} on the same rows, difference {versus} reaches "
                f"below -{margin}"
            )
    decision.passed = not reasons
    return decision
