"""The gold assets built from dbt's manifest without dagster-dbt (easymlops_assets/dbt_specs.py)
are what dagster-dbt's @dbt_assets builds for the same selections, attribute for attribute."""

import os
import shutil
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest

from easymlops.settings import get_settings
from easymlops.warehouse import DBT_PROJECT_DIR, prepare_manifest

# dagster-dbt's own bookkeeping on every spec (its manifest, translator and project objects);
# the light specs have no use for them.
DAGSTER_DBT_OBJECTS = {
    "dagster_dbt/manifest",
    "dagster_dbt/dagster_dbt_translator",
    "dagster_dbt/project",
    "dagster_dbt/project_id",
}


def reference(**selection: Any) -> dg.AssetsDefinition:
    from dagster_dbt import DbtProject, dbt_assets

    from easymlops_assets.partitions import daily_partitions, single_run

    project = DbtProject(project_dir=DBT_PROJECT_DIR, profiles_dir=DBT_PROJECT_DIR)
    partitions = {"partitions_def": daily_partitions} if selection.pop("daily", False) else {}

    @dbt_assets(
        manifest=project.manifest_path,
        project=project,
        backfill_policy=single_run,
        **selection,
        **partitions,
    )
    def reference_assets():  # type: ignore[no-untyped-def]  # never run
        yield from ()

    return reference_assets


def spec_fields(spec: dg.AssetSpec) -> dict[str, Any]:
    return {
        "deps": sorted((d.asset_key, d.partition_mapping) for d in spec.deps),
        "description": spec.description,
        "metadata": {k: v for k, v in spec.metadata.items() if k not in DAGSTER_DBT_OBJECTS},
        "skippable": spec.skippable,
        "code_version": spec.code_version,
        "owners": spec.owners,
        "tags": spec.tags,
        "kinds": spec.kinds,
        "partitions_def": spec.partitions_def,
        "automation_condition": spec.automation_condition,
    }


def check_fields(spec: dg.AssetCheckSpec) -> dict[str, Any]:
    return {
        "description": spec.description,
        "blocking": spec.blocking,
        "additional_deps": sorted(d.asset_key for d in spec.additional_deps),
        "metadata": dict(spec.metadata or {}),
    }


@pytest.mark.parametrize(
    ("ours_name", "selection"),
    [
        ("gold_models", {"exclude": "tag:daily+"}),
        ("gold_daily_models", {"select": "tag:daily", "daily": True}),
        ("gold_training_models", {"select": "tag:daily+", "exclude": "tag:daily"}),
    ],
)
def test_the_gold_assets_are_what_dagster_dbt_builds(
    ours_name: str, selection: dict[str, Any]
) -> None:
    prepare_manifest()
    import easymlops_assets.defs.warehouse.assets as gold

    ours: dg.AssetsDefinition = getattr(gold, ours_name)
    theirs = reference(**selection)

    assert {s.key for s in ours.specs} == {s.key for s in theirs.specs}
    theirs_by_key = {s.key: s for s in theirs.specs}
    for spec in ours.specs:
        # The group is this project's choice (dagster-dbt would take the dbt group or none).
        assert spec.group_name == "warehouse"
        assert spec_fields(spec) == spec_fields(theirs_by_key[spec.key]), spec.key

    assert {c.key for c in ours.check_specs} == {c.key for c in theirs.check_specs}
    theirs_checks = {c.key: c for c in theirs.check_specs}
    for check in ours.check_specs:
        assert check_fields(check) == check_fields(theirs_checks[check.key]), check.key

    assert ours.partitions_def == theirs.partitions_def
    assert ours.backfill_policy == theirs.backfill_policy
    assert ours.can_subset and theirs.can_subset


def test_the_selections_cover_every_model_once() -> None:
    prepare_manifest()
    from easymlops_assets.defs.warehouse.assets import GOLD, GOLD_DAILY, GOLD_TRAINING, manifest

    keys = [spec.key for s in (GOLD, GOLD_DAILY, GOLD_TRAINING) for spec in s.specs]
    assert sorted(keys) == sorted(manifest.asset_key(u) for u in manifest.asset_ids())
    assert len(keys) == len(set(keys))


def build_gold(resources: dict[str, object]) -> None:
    """The three gold selections in Dagster, in lineage order, the daily one over D1..D3 of
    tests/test_dbt.py's dataset: each succeeds with a passed result for every one of its checks."""
    from test_dbt import D1, D3

    from easymlops_assets.defs.warehouse.assets import (
        gold_daily_models,
        gold_models,
        gold_training_models,
    )
    from easymlops_assets.partitions import partition_range_tags

    with dg.instance_for_test() as instance:
        for assets, tags in (
            (gold_models, {}),
            (gold_daily_models, partition_range_tags(str(D1), str(D3))),
            (gold_training_models, {}),
        ):
            result = dg.materialize([assets], resources=resources, instance=instance, tags=tags)
            assert result.success
            evaluations = result.get_asset_check_evaluations()
            assert {e.asset_check_key for e in evaluations} == set(assets.check_keys)
            assert all(e.passed for e in evaluations), [e for e in evaluations if not e.passed]


@pytest.fixture(scope="module")
def gold_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """The three gold selections built in Dagster on a DuckDB warehouse over the silver
    dataset of tests/test_dbt.py; yields the resources of that run."""
    from test_dbt import write_silver

    from easymlops_assets.defs.warehouse.resources import DbtCli, dbt_executable
    from easymlops_assets.resources import PlatformConfig, Warehouse

    base = tmp_path_factory.mktemp("gold-specs")
    write_silver(base / "lake")
    prepare_manifest()
    saved = dict(os.environ)  # the dbt step exports its settings to the environment
    os.environ.update(
        {
            "EASYMLOPS_HOME": str(base / "home"),
            "EASYMLOPS_LAKE_URI": str(base / "lake"),
            "EASYMLOPS_WAREHOUSE_PATH": str(base / "warehouse.duckdb"),
            "EASYMLOPS_HOLDOUT_DAYS": "1",
            "EASYMLOPS_SESSION_TIMEOUT_SECONDS": "0",
            "EASYMLOPS_WAREHOUSE_BACKEND": "duckdb",
        }
    )
    try:
        platform = PlatformConfig()
        resources: dict[str, object] = {
            "platform": platform,
            "warehouse": Warehouse(platform=platform),
            "dbt": DbtCli(dbt_executable=dbt_executable(get_settings())),
        }
        build_gold(resources)
        yield resources
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(base, ignore_errors=True)


def test_a_subset_builds_only_the_selected_model_and_runs_only_its_checks(
    gold_run: dict[str, object],
) -> None:
    from easymlops_assets.defs.warehouse.assets import gold_models

    dim_users = dg.AssetKey("dim_users")
    result = dg.materialize([gold_models], resources=gold_run, selection=[dim_users])
    assert result.success
    assert {m.asset_key for m in result.get_asset_materialization_events()} == {dim_users}
    checks = {e.asset_check_key for e in result.get_asset_check_evaluations()}
    assert checks == {key for key in gold_models.check_keys if key.asset_key == dim_users}


def test_a_failing_dbt_test_is_a_failed_check_and_fails_the_step(
    gold_run: dict[str, object],
) -> None:
    """Plant a duplicate user in dim_users, then run that one check alone: dbt's
    unique test fails, Dagster records the check as failed (error severity) and the step
    fails; no model is rebuilt, which would have removed the duplicate."""
    import duckdb

    from easymlops_assets.defs.warehouse.assets import gold_models

    with duckdb.connect(os.environ["EASYMLOPS_WAREHOUSE_PATH"]) as con:
        con.execute("insert into dim_users select * from dim_users limit 1")
    key = dg.AssetCheckKey(dg.AssetKey("dim_users"), "unique_dim_users_user_id")
    result = dg.materialize(
        [gold_models],
        resources=gold_run,
        selection=dg.AssetSelection.checks(key),
        raise_on_error=False,
    )
    assert not result.success
    assert result.get_asset_materialization_events() == []
    [evaluation] = result.get_asset_check_evaluations()
    assert evaluation.asset_check_key == key
    assert evaluation.passed is False
    assert evaluation.severity == dg.AssetCheckSeverity.ERROR
    assert evaluation.metadata["dagster_dbt/failed_row_count"].value == 1
