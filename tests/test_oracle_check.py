"""`model_close_to_oracle` through its check op: a weak model's ratio warns, a close one passes,
and without ground truth it says "not applicable"."""

from __future__ import annotations

import dagster as dg
import pytest

from easymlops_assets.defs.training.assets import MIN_ORACLE_RATIO, model_close_to_oracle


def run_check(metadata: dict[str, float]) -> dg.AssetCheckResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.report_runless_asset_event(
        dg.AssetMaterialization("purchase_model", metadata=metadata)
    )
    result = model_close_to_oracle(dg.build_asset_check_context(instance=instance))
    assert isinstance(result, dg.AssetCheckResult)
    return result


@pytest.mark.parametrize(("test_auc", "passes"), [(0.7138, False), (0.7500, True)])
def test_ratio_below_the_goal_warns(test_auc: float, passes: bool) -> None:
    oracle = 0.7771
    result = run_check(
        {"test_auc": test_auc, "oracle_test_auc": oracle, "model_oracle_ratio": test_auc / oracle}
    )
    assert result.passed is passes
    assert result.severity == dg.AssetCheckSeverity.WARN
    assert (test_auc / oracle >= MIN_ORACLE_RATIO) is passes
    assert f"{test_auc / oracle:.3f}" in (result.description or "")


def test_without_ground_truth_it_is_not_applicable() -> None:
    result = run_check({"test_auc": 0.71})
    assert result.passed and result.metadata["applicable"] == dg.BoolMetadataValue(False)
    assert "not applicable" in (result.description or "")
