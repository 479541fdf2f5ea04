"""The whole code location loads, and its asset graph matches the reviewed snapshot.

After an intended change, regenerate the snapshot with
`UPDATE_SNAPSHOTS=1 uv run pytest tests/test_definitions.py` and review the diff."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from easymlops.warehouse import prepare_manifest

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"


@pytest.fixture(scope="module")
def definitions() -> dg.Definitions:
    prepare_manifest()
    from easymlops_assets.definitions import defs

    return defs()


def graph_snapshot(definitions: dg.Definitions) -> dict[str, Any]:
    graph = definitions.resolve_asset_graph()
    assets = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        assets[key.to_user_string()] = {
            "deps": sorted(p.to_user_string() for p in node.parent_keys),
            "group": node.group_name,
            "materializable": node.is_materializable,
            "partitioned": node.partitions_def is not None,
            "checks": sorted(c.name for c in graph.asset_check_keys if c.asset_key == key),
        }
    return {"assets": assets, "jobs": sorted(j.name for j in definitions.resolve_all_job_defs())}


def test_asset_graph_matches_snapshot(definitions: dg.Definitions) -> None:
    current = graph_snapshot(definitions)
    if os.environ.get("UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())


def test_lineage_runs_from_kafka_to_serving(definitions: dg.Definitions) -> None:
    graph = definitions.resolve_asset_graph()
    upstream = graph.get(dg.AssetKey("serving_deployment")).parent_keys
    seen: set[dg.AssetKey] = set()
    while upstream:
        key = upstream.pop()
        if key not in seen:
            seen.add(key)
            upstream |= set(graph.get(key).parent_keys)
    names = {k.to_user_string() for k in seen}
    assert {
        "events_raw",
        "events_validated",
        "bronze_events",
        "silver_events",
        "stg_events",
        "fct_cart_events",
        "user_features",
        "product_features",
        "training_set",
        "online_features",
        "purchase_model",
    } <= names


def test_every_materializable_layer_has_a_check(definitions: dg.Definitions) -> None:
    graph = definitions.resolve_asset_graph()
    checked = {c.asset_key for c in graph.asset_check_keys}
    for name in (
        "bronze_events",
        "silver_events",
        "training_set",
        "online_features",
        "purchase_model",
        "serving_deployment",
    ):
        assert dg.AssetKey(name) in checked, name


def test_promotion_gate_and_data_guards_are_blocking(definitions: dg.Definitions) -> None:
    specs = (
        {
            (spec.asset_key.to_user_string(), spec.name): spec.blocking
            for spec in definitions.resolve_asset_graph().asset_check_specs  # type: ignore[attr-defined]
        }
        if hasattr(definitions.resolve_asset_graph(), "asset_check_specs")
        else None
    )
    if specs is None:
        checks = [
            spec
            for assets_def in definitions.resolve_asset_graph().assets_defs
            for spec in assets_def.check_specs
        ]
        specs = {(s.asset_key.to_user_string(), s.name): s.blocking for s in checks}
    assert specs[("purchase_model", "promotion_gate")] is True
    assert specs[("silver_events", "silver_events_valid")] is True
    assert specs[("bronze_events", "bronze_events_offsets_unique")] is True


# Libraries the code location must not import when it loads: every run, and with the spawn
# executor every step, loads it in a fresh interpreter (issue 15; `make bench-dagster`).
HEAVY = (
    *("mlflow", "ray", "xgboost", "sklearn", "scipy", "dagster_k8s", "kubernetes", "dagster_aws"),
    *("dbt", "dagster_dbt"),
)
LOADED_MODULES = (
    "import sys, json\n"
    "{load}\n"
    "print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))\n"
)


def top_level_modules_after(load: str) -> set[str]:
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", LOADED_MODULES.format(load=load)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_loading_the_code_location_imports_no_heavy_library() -> None:
    prepare_manifest()
    loaded = top_level_modules_after("import easymlops_assets.definitions as d; d.defs()")
    assert "dagster" in loaded  # the probe sees what the definitions import
    assert loaded.isdisjoint(HEAVY), sorted(loaded & set(HEAVY))


def test_the_cli_imports_neither_dagster_nor_the_data_libraries() -> None:
    # `easymlops --help` should answer in well under a second: typer, rich, pydantic only.
    loaded = top_level_modules_after("import easymlops.cli")
    assert loaded.isdisjoint({*HEAVY, "dagster", "polars", "duckdb", "pyarrow", "deltalake"}), (
        sorted(loaded & {*HEAVY, "dagster", "polars", "duckdb", "pyarrow", "deltalake"})
    )


def test_the_defs_folder_loads_what_dagsters_own_loader_loads(
    definitions: dg.Definitions,
) -> None:
    from easymlops_assets.definitions import DEFS_FOLDER

    reference = dg.load_from_defs_folder(path_within_project=DEFS_FOLDER).get_repository_def()
    ours = definitions.get_repository_def()
    assert ours.asset_graph.get_all_asset_keys() == reference.asset_graph.get_all_asset_keys()
    assert ours.asset_graph.asset_check_keys == reference.asset_graph.asset_check_keys
    assert {j.name for j in ours.get_all_jobs()} == {j.name for j in reference.get_all_jobs()}
    assert {s.name for s in ours.schedule_defs} == {s.name for s in reference.schedule_defs}
    assert {s.name for s in ours.sensor_defs} == {s.name for s in reference.sensor_defs}
    assert set(ours.get_top_level_resources()) == set(reference.get_top_level_resources())


@pytest.mark.parametrize(
    ("kind", "expected"),
    [("forkserver", "multiprocess"), ("spawn", "multiprocess"), ("in_process", "in_process")],
)
def test_the_executor_follows_the_setting(
    kind: str, expected: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from easymlops.settings import get_settings
    from easymlops_assets.definitions import defs

    monkeypatch.setenv("EASYMLOPS_DAGSTER_EXECUTOR", kind)
    get_settings.cache_clear()
    try:
        job = defs().resolve_job_def("lakehouse_refresh")
    finally:
        get_settings.cache_clear()
    assert job.executor_def.name == expected


def test_the_dbt_version_without_a_subprocess_is_the_one_dbt_reports() -> None:
    from dagster_dbt import DbtCliResource

    from easymlops.settings import Settings
    from easymlops.warehouse import DBT_PROJECT_DIR
    from easymlops_assets.dbt_run import WarehouseDbt
    from easymlops_assets.defs.warehouse.resources import dbt_executable

    real_dbt = dbt_executable(Settings(dbt_forkserver=False))
    project = {"project_dir": str(DBT_PROJECT_DIR), "profiles_dir": str(DBT_PROJECT_DIR)}

    # The override replaces something dagster-dbt still has (else it would silently do nothing).
    assert isinstance(vars(DbtCliResource).get("_cli_version"), functools.cached_property)
    ours = WarehouseDbt(**project, dbt_executable=real_dbt)._cli_version
    probed = DbtCliResource(**project, dbt_executable=real_dbt)._cli_version
    assert ours == probed


def test_the_dbt_steps_skip_only_an_adapter_they_do_not_use() -> None:
    """WarehouseDbt skips dagster-dbt's in-process adapter; that adapter only serves
    dagster-dbt's fetch_row_counts/fetch_column_metadata, which no asset may call then."""
    import inspect

    from dagster_dbt import DbtCliResource

    import easymlops_assets.dbt_run as dbt_run
    import easymlops_assets.defs.warehouse.assets as warehouse_assets

    # The override replaces a method dagster-dbt still calls (else it would do nothing).
    assert "self._initialize_dbt_core_adapter(" in inspect.getsource(DbtCliResource.cli)
    source = inspect.getsource(warehouse_assets) + inspect.getsource(dbt_run)
    assert ".fetch_row_counts(" not in source and ".fetch_column_metadata(" not in source
