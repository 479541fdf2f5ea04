"""The whole code location loads, and its asset graph matches the reviewed snapshot.

After an intended change, regenerate the snapshot with
`UPDATE_SNAPSHOTS=1 uv run pytest tests/test_definitions.py` and review the diff."""

from __future__ import annotations

import json
import os
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
