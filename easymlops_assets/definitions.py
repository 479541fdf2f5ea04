"""The Dagster code location: everything under defs/ is loaded, one folder per domain."""

import logging
from pathlib import Path

import dagster as dg
from dagster_k8s import PipesK8sClient

from easymlops.settings import get_settings
from easymlops_assets.k8s import PIPES_K8S_CLIENT, flink_validation_k8s_asset

# Dagster prints every run event with its own console logger. Messages that libraries send
# through `get_dagster_logger` (dagster-dbt's "Running dbt command ...") also propagate to the
# root logger, which dbt's telemetry package configures at import (`logging.basicConfig()` in
# snowplow_tracker): each line then printed twice, the second time as `INFO:dagster.builtin:...`.
logging.getLogger("dagster").propagate = False


@dg.definitions
def defs() -> dg.Definitions:
    loaded = dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
    # Which assets exist is decided when the code location loads, so `kubernetes` is read from
    # the settings here, not from a run-time resource.
    if not get_settings().kubernetes:  # a local stack has no Kubernetes to submit Flink to
        return loaded
    return dg.Definitions.merge(
        loaded,
        dg.Definitions(
            assets=[flink_validation_k8s_asset()],
            resources={PIPES_K8S_CLIENT: PipesK8sClient(load_incluster_config=True)},
        ),
    )
