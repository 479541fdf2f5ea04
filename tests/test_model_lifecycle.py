"""Challenger/champion aliases, their history, rollback that survives the next deployment, the
`easymlops model` CLI and the MLflow sensor, against the real MLflow server of the stack."""

from __future__ import annotations

import json
from collections.abc import Iterator

import dagster as dg
import pytest
from typer.testing import CliRunner

from easymlops import promotion, registry
from easymlops.settings import Settings, get_settings
from tests.test_registry import tiny_booster

pytestmark = pytest.mark.services


@pytest.fixture
def settings(stack: Settings, request: pytest.FixtureRequest) -> Iterator[Settings]:
    """The stack with a model of the test's own, exported to the environment so the CLI and the
    sensor (which read get_settings()) see the same model."""
    patch = pytest.MonkeyPatch()
    patch.setenv("EASYMLOPS_MODEL_NAME", f"lifecycle_{request.node.name}"[:60])
    get_settings.cache_clear()
    try:
        yield get_settings()
    finally:
        patch.undo()
        get_settings.cache_clear()


def register(settings: Settings, seed: int, *, gate: bool = True) -> str:
    booster, _ = tiny_booster(seed)
    version = registry.log_and_register(
        booster, params={"seed": seed}, metrics={"auc": 0.7}, settings=settings
    ).version
    registry.record_gate(version, gate, "test verdict", settings)
    return version


def champion(settings: Settings) -> str | None:
    return registry.aliases(settings).get(settings.champion_alias)


def cli(*args: str) -> str:
    from easymlops.cli import app

    result = CliRunner().invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_rollback_survives_the_next_deployment(settings: Settings) -> None:
    v1, v2 = register(settings, 1), register(settings, 2)
    first = promotion.deploy_gated(v1, settings, by="dagster run a")
    assert (first.champion, first.promoted, first.reason) == (v1, True, "no champion yet")
    second = promotion.deploy_gated(v2, settings, by="dagster run b")
    assert (second.champion, second.promoted) == (v2, True)
    assert registry.aliases(settings) == {"champion": v2, "challenger": v2}

    output = cli("model", "rollback")
    assert f"champion: {v2} -> {v1}" in output
    assert champion(settings) == v1
    assert registry.champion_hold(settings) == int(v2)

    # The next deployment of the same gated version respects the rollback and says why.
    again = promotion.deploy_gated(v2, settings, by="dagster run c")
    assert (again.champion, again.promoted) == (v1, False)
    assert "held at version" in again.reason and "rollback from version" in again.reason
    assert champion(settings) == v1

    # A newer version that passes the gate ends the hold.
    v3 = register(settings, 3)
    third = promotion.deploy_gated(v3, settings, by="dagster run d")
    assert (third.champion, third.promoted) == (v3, True)
    assert registry.champion_hold(settings) is None

    # A second rollback skips v2, which was rolled back from before.
    cli("model", "rollback")
    assert champion(settings) == v1

    champion_moves = [
        (m.from_version, m.to_version, m.by.split(":")[0])
        for m in registry.alias_history(settings)
        if m.alias == "champion"
    ]
    assert champion_moves == [
        (None, v1, "dagster run a"),
        (v1, v2, "dagster run b"),
        (v2, v1, "cli"),
        (v1, v3, "dagster run d"),
        (v3, v1, "cli"),
    ]
    listing = cli("model", "list")
    assert "champion held" in listing and f"#{len(registry.alias_history(settings))}" in listing


def test_refused_versions_and_manual_promotion(settings: Settings) -> None:
    good = register(settings, 1)
    bad = register(settings, 2, gate=False)
    with pytest.raises(promotion.NotGated, match="promotion gate failed: test verdict"):
        promotion.deploy_gated(bad, settings, by="test")
    from easymlops.cli import app

    refused = CliRunner().invoke(app, ["model", "promote", bad])
    assert refused.exit_code == 1 and "--force" in refused.output
    assert champion(settings) is None

    promotion.deploy_gated(good, settings, by="test")
    newer = register(settings, 3)
    manual = settings.model_copy(update={"promotion": "manual"})
    outcome = promotion.deploy_gated(newer, manual, by="test")
    assert (outcome.champion, outcome.promoted) == (good, False)
    assert registry.aliases(settings) == {"champion": good, "challenger": newer}
    assert "promotion is manual" in outcome.reason

    # The promote_challenger job (the UI's step) makes the challenger champion.
    from easymlops_assets.defs.serving.assets import promote_challenger
    from easymlops_assets.resources import PlatformConfig

    assert promote_challenger.execute_in_process(resources={"platform": PlatformConfig()}).success
    assert champion(settings) == newer


def tick(cursor: str | None) -> dg.SensorResult:
    from easymlops_assets.defs.automation.sensors import mlflow_registry_sensor
    from easymlops_assets.resources import PlatformConfig

    with dg.DagsterInstance.ephemeral() as instance:
        context = dg.build_sensor_context(instance=instance, cursor=cursor)
        result = mlflow_registry_sensor(context, platform=PlatformConfig())
    assert isinstance(result, dg.SensorResult)
    return result


def test_mlflow_sensor_sees_each_move_once(settings: Settings) -> None:
    v1, v2 = register(settings, 1), register(settings, 2)
    promotion.deploy_gated(v1, settings, by="dagster run a")
    baseline = tick(None)
    assert not baseline.run_requests and not baseline.asset_events

    # Moved in MLflow directly, as from its UI: no history entry exists for it.
    registry.client(settings).set_registered_model_alias(settings.model_name, "champion", v2)
    seen = tick(baseline.cursor)
    observations = [
        e for e in seen.asset_events if e.asset_key == dg.AssetKey("serving_deployment")
    ]
    assert len(observations) == 1
    meta = {k: v.value for k, v in observations[0].metadata.items()}
    assert (meta["alias"], meta["from_version"], meta["to_version"]) == ("champion", v1, v2)
    assert meta["by"] == registry.OUTSIDE
    assert [r.run_key for r in seen.run_requests or []] == [
        f"{settings.model_name}@champion:{meta['history_seq']}"
    ]
    assert registry.champion_hold(settings) == int(v2)  # a move by hand holds the champion

    # Seen once: the next tick has nothing, and the history holds the move once.
    quiet = tick(seen.cursor)
    assert not quiet.run_requests and not quiet.asset_events
    assert sum(m.by == registry.OUTSIDE for m in registry.alias_history(settings)) == 1

    # A CLI rollback and a new version: one observation each, a run for the champion move.
    cli("model", "rollback")
    v3 = register(settings, 3)
    after = tick(quiet.cursor)
    kinds = sorted(e.asset_key.to_user_string() for e in after.asset_events)
    assert kinds == ["purchase_model", "serving_deployment"]
    version_event = next(
        e for e in after.asset_events if e.asset_key == dg.AssetKey("purchase_model")
    )
    assert version_event.metadata["model_version"].value == v3
    assert len(after.run_requests or []) == 1
    assert json.loads(after.cursor or "{}")["aliases"]["champion"] == v1

    # A deployment's own move is observed but triggers no verification run.
    promotion.deploy_gated(v3, settings, by="dagster run z")
    own = tick(after.cursor)
    assert own.asset_events and not own.run_requests
