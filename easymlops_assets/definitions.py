"""The Dagster code location: everything under defs/ is loaded, one folder per domain."""

import logging
from pathlib import Path

import dagster as dg

from easymlops.settings import get_settings

# Dagster prints every run event with its own console logger. Messages that libraries send
# through `get_dagster_logger` (dagster-dbt's "Running dbt command ...") also propagate to the
# root logger, which dbt's telemetry package configures at import (`logging.basicConfig()` in
# snowplow_tracker): each line then printed twice, the second time as `INFO:dagster.builtin:...`.
logging.getLogger("dagster").propagate = False


DEFS_FOLDER = Path(__file__).parent / "defs"


def _defs_folder() -> dg.Definitions:
    """What `dg.load_from_defs_folder` loads, without the catalogue of plugin component types
    it adds for `dg`'s tooling: building that imports every installed Dagster integration's
    components (dagster-aws's alone ~3 s) on every load, i.e. in every step process, and this
    project declares no YAML components. tests/test_definitions.py checks that both load the
    same assets, checks, jobs, schedules, sensors and resources."""
    tree = dg.ComponentTree.for_project(path_within_project=DEFS_FOLDER)
    parts = sorted(
        path.name
        for path in DEFS_FOLDER.iterdir()
        if (path.is_dir() and (path / "__init__.py").exists())
        or (path.suffix == ".py" and path.name != "__init__.py")
    )
    return dg.Definitions.merge(*(tree.build_defs_at_path(part) for part in parts))


def executor(kind: str) -> dg.ExecutorDefinition:
    """The executor of every job, by `EASYMLOPS_DAGSTER_EXECUTOR` (settings.py).

    Dagster's default multiprocess executor spawns a fresh interpreter per step, which imports
    the code location again (dagster + dagster-dbt alone ~2.5 s on 2 cores). With "forkserver",
    one server process per run imports this module once and each step is forked from it: steps
    keep their own processes (a crash or a leak ends with its step) and start in a fraction of a
    second. dbt and Ray run in processes of their own whichever executor runs the step (the dbt
    CLI; Ray's workers)."""
    if kind == "in_process":
        return dg.in_process_executor
    start_method: dict = {"spawn": {}}
    if kind == "forkserver":
        # The asset modules, not just this one: `defs()` imports them, and a step that has to
        # import them itself pays what spawn pays. None of them starts a thread at import,
        # which forking relies on.
        start_method = {"forkserver": {"preload_modules": [__name__, *_defs_modules()]}}
    return dg.multiprocess_executor.configured({"start_method": start_method})


def _defs_modules() -> list[str]:
    return sorted(
        ".".join(
            (
                __package__ or "",
                DEFS_FOLDER.name,
                *path.relative_to(DEFS_FOLDER).with_suffix("").parts,
            )
        )
        for path in DEFS_FOLDER.rglob("*.py")
        if path.name != "__init__.py"
    )


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.Definitions.merge(
        _defs_folder(), dg.Definitions(executor=executor(get_settings().dagster_executor))
    )
    # Which assets exist is decided when the code location loads, so `kubernetes` is read from
    # the settings here, not from a run-time resource.
    if not get_settings().kubernetes:  # a local stack has no Kubernetes to submit Flink to
        return loaded
    # dagster-k8s (with the kubernetes client, ~1.5 s) is imported only where it is used.
    from dagster_k8s import PipesK8sClient

    from easymlops_assets.k8s import PIPES_K8S_CLIENT, flink_validation_k8s_asset

    return dg.Definitions.merge(
        loaded,
        dg.Definitions(
            assets=[flink_validation_k8s_asset()],
            resources={PIPES_K8S_CLIENT: PipesK8sClient(load_incluster_config=True)},
        ),
    )
