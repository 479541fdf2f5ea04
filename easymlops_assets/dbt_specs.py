"""The dbt project's models and tests as Dagster asset and check specs, read from dbt's
manifest.json without importing dbt-core or dagster-dbt.

Why not dagster-dbt's `@dbt_assets`: importing dagster-dbt imports dbt-core (2.4 s on 2 cores),
and `@dbt_assets` runs dbt's node selector when the definitions load (another 0.5 s). Every run,
and with the spawn executor every step, loads the code location, so that cost was most of a
load (issue 15: load in <= 3 s). The specs built here are what dagster-dbt's default
translator gives for this project, attribute for attribute (keys, deps, descriptions, tags,
code versions, metadata, check specs; `tests/test_dbt_specs.py` compares them with dagster-dbt's
own), and the steps still run dbt through dagster-dbt, imported when a dbt step runs
(`easymlops_assets/dbt_run.py`). Selections are the few this project needs: by
tag, and a tag's descendants, over models, seeds and snapshots.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import dagster as dg
from dagster._utils.tags import is_valid_tag_key

ASSET_TYPES = ("model", "seed", "snapshot")
GROUP = "warehouse"


@dataclass(frozen=True)
class DbtSelection:
    """The assets and checks of one dbt selection, and the dbt names that select them."""

    specs: list[dg.AssetSpec]
    check_specs: list[dg.AssetCheckSpec]
    node_names: dict[dg.AssetKey, str]
    test_names: dict[dg.AssetCheckKey, str]


class DbtManifest:
    """dbt's parsed project (target/manifest.json of `dbt parse`)."""

    def __init__(self, path: Path) -> None:
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: the dbt project has not been parsed (run `make manifest`, "
                "or `dagster dev`, which parses it when the code location loads)"
            )
        self.path = path
        self.raw: dict[str, Any] = json.loads(path.read_text())

    def node(self, unique_id: str) -> Mapping[str, Any]:
        found = self.raw["nodes"].get(unique_id) or self.raw["sources"].get(unique_id)
        if found is None:
            raise KeyError(f"{unique_id} is not in {self.path}")
        return found

    @cached_property
    def adapter_type(self) -> str:
        return str(self.raw.get("metadata", {}).get("adapter_type") or "dbt")

    def asset_ids(self) -> list[str]:
        return sorted(
            unique_id
            for unique_id, props in self.raw["nodes"].items()
            if props["resource_type"] in ASSET_TYPES and not _ephemeral(props)
        )

    def with_tag(self, tag: str) -> set[str]:
        return {u for u in self.asset_ids() if tag in self.node(u).get("tags", [])}

    def descendants(self, unique_ids: Iterable[str]) -> set[str]:
        """The assets downstream of these (not including them unless one is downstream of
        another), as dbt's `+` suffix selects them."""
        found: set[str] = set()
        todo = list(unique_ids)
        while todo:
            for child in self.raw["child_map"].get(todo.pop(), []):
                if child not in found:
                    found.add(child)
                    todo.append(child)
        return found & set(self.asset_ids())

    def asset_key(self, unique_id: str) -> dg.AssetKey:
        props = self.node(unique_id)
        configured = _meta(props).get("dagster", {}).get("asset_key")
        if configured:
            return dg.AssetKey(configured)
        if props["resource_type"] == "source":
            return dg.AssetKey([props["source_name"], props["name"]])
        if props.get("version"):
            return dg.AssetKey([props["alias"]])
        schema = props["config"].get("schema")
        return dg.AssetKey([schema, props["name"]] if schema else [props["name"]])

    def upstream_ids(self, unique_id: str) -> list[str]:
        parents = self.node(unique_id).get("depends_on", {}).get("nodes", [])
        for parent in parents:
            if _ephemeral(self.node(parent)):
                raise ValueError(
                    f"{unique_id} depends on the ephemeral model {parent}: dbt_specs does not "
                    "look through ephemeral models (dagster-dbt does); add that here first"
                )
        return [p for p in parents if p.startswith(("model.", "seed.", "snapshot.", "source."))]

    def asset_spec(self, unique_id: str) -> dg.AssetSpec:
        props = self.node(unique_id)
        deps: dict[dg.AssetKey, None] = {}
        for parent in self.upstream_ids(unique_id):
            deps.setdefault(self.asset_key(parent))
        return dg.AssetSpec(
            key=self.asset_key(unique_id),
            deps=list(deps),
            description=_description(props),
            metadata={**self._metadata(props), "dagster_dbt/unique_id": unique_id},
            skippable=True,
            group_name=GROUP,
            code_version=_code_version(props),
            owners=_meta(props).get("dagster", {}).get("owners"),
            tags={tag: "" for tag in props.get("tags", []) if is_valid_tag_key(tag)},
            kinds={"dbt", self.adapter_type},
        )

    def _metadata(self, props: Mapping[str, Any]) -> dict[str, Any]:
        columns = props.get("columns", {})
        schema = (
            dg.TableSchema(
                columns=[
                    dg.TableColumn(
                        name=name,
                        type=column.get("data_type") or "?",
                        description=column.get("description"),
                        tags={tag: "" for tag in column.get("tags", [])},
                    )
                    for name, column in columns.items()
                ]
            )
            if columns
            else None
        )
        relation = ".".join(
            part
            for part in (props.get("database"), props.get("schema"), props.get("alias"))
            if part
        )
        metadata: dict[str, Any] = {
            "dagster-dbt/materialization_type": props.get("config", {}).get("materialized"),
            "dagster/storage_kind": self.adapter_type,
        }
        if schema is not None:
            metadata["dagster/column_schema"] = schema
        if relation:
            metadata["dagster/table_name"] = relation
        return metadata

    def check_key(self, test_id: str) -> dg.AssetCheckKey | None:
        """The check a dbt test is: on the node it is attached to (a generic test's model, a
        singular test's only parent, or the model its `meta.dagster.ref` names)."""
        props = self.node(test_id)
        parents = set(props["depends_on"]["nodes"])
        attached = props.get("attached_node")
        if len(parents) == 1:
            [attached] = parents
        ref = _meta(props).get("dagster", {}).get("ref")
        if ref:
            wanted = (
                ref["name"],
                ref.get("package") or self.raw["metadata"]["project_name"],
                ref.get("version"),
            )
            attached = next(
                (
                    unique_id
                    for unique_id, node in self.raw["nodes"].items()
                    if (node["name"], node["package_name"], node.get("version")) == wanted
                ),
                None,
            )
        if attached is None:
            return None
        return dg.AssetCheckKey(self.asset_key(attached), props["name"])

    def check_spec(self, test_id: str, key: dg.AssetCheckKey) -> dg.AssetCheckSpec:
        props = self.node(test_id)
        additional = {self.asset_key(p) for p in self.raw["parent_map"].get(test_id, [])}
        additional.discard(key.asset_key)
        severity = props.get("config", {}).get("severity") or "error"
        return dg.AssetCheckSpec(
            name=key.name,
            asset=key.asset_key,
            description=props.get("meta", {}).get("description"),
            additional_deps=additional,
            metadata={"dagster_dbt/unique_id": test_id},
            blocking=severity.lower() == "error",
        )

    def selection(self, unique_ids: set[str]) -> DbtSelection:
        """Specs for these assets and for the tests attached to them."""
        specs = [self.asset_spec(u) for u in sorted(unique_ids)]
        keys = {spec.key for spec in specs}
        checks: dict[dg.AssetCheckKey, dg.AssetCheckSpec] = {}
        test_names: dict[dg.AssetCheckKey, str] = {}
        for test_id in sorted(u for u in self.raw["nodes"] if u.startswith("test.")):
            key = self.check_key(test_id)
            if key is not None and key.asset_key in keys:
                checks[key] = self.check_spec(test_id, key)
                test_names[key] = self.node(test_id)["name"]
        return DbtSelection(
            specs=specs,
            check_specs=list(checks.values()),
            node_names={self.asset_key(u): self.node(u)["name"] for u in unique_ids},
            test_names=test_names,
        )


def _meta(props: Mapping[str, Any]) -> Mapping[str, Any]:
    return props.get("config", {}).get("meta", {}) or props.get("meta", {})


def _ephemeral(props: Mapping[str, Any]) -> bool:
    return props.get("config", {}).get("materialized") == "ephemeral"


def _description(props: Mapping[str, Any]) -> str:
    code = textwrap.indent(props.get("raw_sql") or props.get("raw_code", ""), "    ")
    title = props.get("description") or f"dbt {props['resource_type']} {props['name']}"
    return f"{title}\n\n#### Raw SQL:\n```sql\n{code}\n```"


def _code_version(props: Mapping[str, Any]) -> str | None:
    code = props.get("raw_sql") or props.get("raw_code")
    if code:
        return hashlib.sha1(code.encode("utf-8")).hexdigest()
    return props.get("checksum", {}).get("checksum")
