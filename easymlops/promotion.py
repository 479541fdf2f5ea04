"""The promotion gate, evaluated: score the challenger, the price-only baseline and the
current champion on the same held-out rows, then let `easymlops.gate.decide` judge."""

from __future__ import annotations

from dataclasses import dataclass

from easymlops import gate, registry, training
from easymlops.settings import Settings


@dataclass
class GateEvaluation:
    version: str
    champion_version: str | None
    test_rows: int
    test_period: str
    decision: gate.GateDecision

    def details(self) -> dict[str, object]:
        """What the gate compared, for the check's metadata and the model version's tags."""
        d = self.decision
        details: dict[str, object] = {
            "model_version": self.version,
            "test_rows": self.test_rows,
            "test_period": self.test_period,
            "challenger_auc": round(d.challenger_auc.estimate, 4),
            "challenger_auc_interval": f"[{d.challenger_auc.low:.4f}, {d.challenger_auc.high:.4f}]",
            "lift_over_baseline": str(d.lift_over_baseline),
            "ceiling": round(d.ceiling, 4),
            "ceiling_source": d.ceiling_source,
            "oracle_auc": "n/a" if d.oracle_auc is None else round(d.oracle_auc, 4),
            "champion_version": self.champion_version or "none",
            "champion_auc": "n/a" if d.champion_auc is None else round(d.champion_auc, 4),
            "vs_champion": "n/a" if d.vs_champion is None else str(d.vs_champion),
            "verdict": "passed" if d.passed else "refused",
        }
        return details


def evaluate(settings: Settings, version: str) -> GateEvaluation:
    """The gate's decision for `version` of `settings.model_name` on the current held-out rows
    of the warehouse (the mature carts of the test period)."""
    data = training.load_training_data(settings)
    test = data.test
    y = training.labels(test)
    challenger = registry.load_booster(f"models:/{settings.model_name}/{version}", settings)
    baseline = training.baseline_model(data, settings)
    champion = registry.champion(settings)
    champion_scores = None
    if champion is not None and champion.version != version:
        champion_scores = training.predict(
            registry.load_booster(champion.model_uri, settings), test
        )
    oracle, _ = training.oracle_scores(settings, test)
    decision = gate.decide(
        y,
        training.predict(challenger, test),
        training.predict(baseline, test),
        champion=champion_scores,
        oracle=oracle,
        min_lift=settings.gate_min_lift,
        margin=settings.gate_margin,
        oracle_margin=settings.gate_oracle_margin,
        max_auc=settings.gate_max_auc,
        resamples=settings.gate_bootstrap,
        seed=settings.tune_seed,
    )
    dates = data.dates(test)
    return GateEvaluation(
        version=version,
        champion_version=champion.version if champion_scores is not None and champion else None,
        test_rows=test.height,
        test_period=f"{dates[0]}..{dates[-1]}" if dates else "",
        decision=decision,
    )
