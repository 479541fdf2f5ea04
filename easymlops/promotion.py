"""The promotion gate, evaluated: score the challenger, the price-only baseline and the
current champion on the same held-out rows, then let `easymlops.gate.decide` judge."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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


def decide(
    settings: Settings,
    labels: np.ndarray,
    challenger: np.ndarray,
    baseline: np.ndarray,
    *,
    champion: np.ndarray | None,
    oracle: np.ndarray | None,
) -> gate.GateDecision:
    """`gate.decide` with the margins and resamples of `settings`."""
    return gate.decide(
        labels,
        challenger,
        baseline,
        champion=champion,
        oracle=oracle,
        min_lift=settings.gate_min_lift,
        margin=settings.gate_margin,
        oracle_margin=settings.gate_oracle_margin,
        max_auc=settings.gate_max_auc,
        resamples=settings.gate_bootstrap,
        seed=settings.tune_seed,
    )


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
    decision = decide(
        settings,
        y,
        training.predict(challenger, test),
        training.predict(baseline, test),
        champion=champion_scores,
        oracle=oracle,
    )
    dates = data.dates(test)
    return GateEvaluation(
        version=version,
        champion_version=champion.version if champion_scores is not None and champion else None,
        test_rows=test.height,
        test_period=f"{dates[0]}..{dates[-1]}" if dates else "",
        decision=decision,
    )


# -- deployment: challenger first, then champion ---------------------------------------------------


class NotGated(RuntimeError):
    """The version did not pass the promotion gate (or was never gated)."""


@dataclass(frozen=True)
class Deployment:
    version: str  # the gated version deployed as challenger
    champion: str  # the champion after the decision
    promoted: bool  # whether this deployment moved the champion
    reason: str


def champion_decision(version: str, settings: Settings) -> tuple[bool, str]:
    """Whether a version that passed the gate should become champion now, and why (not)."""
    current = registry.aliases(settings).get(settings.champion_alias)
    if current is None:
        return True, "no champion yet"
    if current == version:
        return False, f"version {version} is already champion"
    hold = registry.champion_hold(settings)
    if hold is not None and int(version) <= hold:
        moves = [m for m in registry.alias_history(settings) if m.alias == settings.champion_alias]
        last = moves[-1].describe() if moves else f"{settings.champion_alias} moved by hand"
        return False, (
            f"champion held at version {current} (last move: {last}); only a version newer "
            f"than {hold} that passes the gate replaces it"
        )
    if settings.promotion == "manual":
        return False, (
            f"promotion is manual: `easymlops model promote {version}` or the promote_challenger "
            "job makes it champion"
        )
    if int(version) < int(current):
        return False, f"version {version} is older than champion {current}"
    return True, f"passed the promotion gate, replaces version {current}"


def require_gate_passed(version: str, settings: Settings) -> None:
    verdict, reason = registry.gate_verdict(version, settings)
    if verdict != "passed":
        raise NotGated(
            f"version {version} of {settings.model_name} is not promoted: promotion gate "
            f"{verdict}{': ' + reason if reason else ''}"
        )


def deploy_gated(version: str, settings: Settings, *, by: str) -> Deployment:
    """Make a gated `version` the challenger, then the champion if `champion_decision` says so.
    Raises NotGated for a version that failed the gate or never met it."""
    require_gate_passed(version, settings)
    if registry.aliases(settings).get(settings.challenger_alias) != version:
        registry.promote(
            version, settings, alias=settings.challenger_alias, by=by, reason="passed the gate"
        )
    promote, reason = champion_decision(version, settings)
    if promote:
        registry.promote(version, settings, by=by, reason=reason)
    champion = registry.aliases(settings)[settings.champion_alias]
    return Deployment(version=version, champion=champion, promoted=promote, reason=reason)
