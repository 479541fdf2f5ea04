"""Running `dbt build` from a gold step through dagster-dbt, and its events as this step's
outputs and check results.

Imported by a dbt step when it runs, never when the definitions load: it imports dagster-dbt
and so dbt-core (2.4 s on 2 cores; see dbt_specs.py for why the definitions do without).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from importlib.metadata import version as installed_version
from pathlib import Path

import dagster as dg
from dagster._core.definitions.asset_checks.asset_check_evaluation import AssetCheckEvaluation
from dagster_dbt import DbtCliResource
from packaging import version

from easymlops_assets.dbt_specs import DbtManifest, DbtSelection


class WarehouseDbt(DbtCliResource):
    """DbtCliResource without its `dbt --version` subprocess and in-process adapter per step.

    dagster-dbt runs `dbt --version` (a whole dbt start, ~3.5 s of CPU here) in every step
    process to learn whether the executable is dbt Core or dbt Fusion. The executable is the
    dbt Core of this virtualenv (or the fork-server client in front of it), so its version is
    the installed dbt-core's (tests/test_definitions.py compares both)."""

    @cached_property
    def _cli_version(self) -> version.Version:
        return version.Version(installed_version("dbt-core"))

    def _initialize_dbt_core_adapter(self, args: Sequence[str]) -> None:  # type: ignore[override]
        """No adapter in the step's process. dagster-dbt loads dbt's profile and project and
        registers the adapter in-process before each command (1-3 s per step here) only for
        its `fetch_row_counts`/`fetch_column_metadata`, which these assets do not use: they
        count rows themselves after dbt has released DuckDB's lock (assets.py)."""
        return None


def selection_args(context: dg.AssetExecutionContext, selection: DbtSelection) -> list[str]:
    """dbt arguments that build exactly the step's selected models and run exactly its
    selected tests: named one by one, with dbt's indirect test selection off (dbt would
    otherwise also run unselected tests of the selected models, and tests that merely read
    them)."""
    names = [selection.node_names[key] for key in sorted(context.selected_asset_keys)]
    names += [selection.test_names[key] for key in sorted(context.selected_asset_check_keys)]
    return ["--select", " ".join(names), "--indirect-selection", "empty"]


@dataclass
class DbtBuild:
    """What a `dbt build` reported: an Output per model built and a check result per test run,
    in dbt's order, and the error to raise once they are reported (a failed model or error
    test makes dbt exit non-zero)."""

    events: list[dg.Output | dg.AssetCheckResult]
    error: Exception | None

    def raise_error(self) -> None:
        if self.error is not None:
            raise self.error


def dbt_build(
    context: dg.AssetExecutionContext,
    *,
    project_dir: Path,
    dbt_executable: str,
    manifest: DbtManifest,
    selection: DbtSelection,
    args: Sequence[str],
) -> DbtBuild:
    """Run `dbt build` for the step's selection to its end. The error is kept, not raised, so
    that the step reports the failed checks before it fails."""
    cli = WarehouseDbt(
        project_dir=str(project_dir), profiles_dir=str(project_dir), dbt_executable=dbt_executable
    )
    invocation = cli.cli(
        ["build", *selection_args(context, selection), *args],
        manifest=manifest.raw,
        raise_on_error=False,
    )
    events: list[dg.Output | dg.AssetCheckResult] = []
    for event in invocation.stream():
        # Without a context dagster-dbt reports what it saw, keyed by asset and check, as an
        # op would; within this multi-asset they are the step's outputs and check results.
        if isinstance(event, dg.AssetMaterialization):
            output = event.asset_key.to_python_identifier()
            events.append(dg.Output(None, output_name=output, metadata=event.metadata))
        elif isinstance(event, AssetCheckEvaluation):
            events.append(
                dg.AssetCheckResult(
                    asset_key=event.asset_key,
                    check_name=event.check_name,
                    passed=event.passed,
                    severity=event.severity,
                    metadata=event.metadata,
                )
            )
        else:
            context.log.debug(f"dbt event not reported as an output or check result: {event}")
    return DbtBuild(events, invocation.get_error())
