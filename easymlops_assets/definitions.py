"""The Dagster code location: everything under defs/ is loaded, one folder per domain."""

import logging
from pathlib import Path

import dagster as dg

# Dagster prints every run event with its own console logger. Messages that libraries send
# through `get_dagster_logger` (dagster-dbt's "Running dbt command ...") also propagate to the
# root logger, which dbt's telemetry package configures at import (`logging.basicConfig()` in
# snowplow_tracker): each line then printed twice, the second time as `INFO:dagster.builtin:...`.
logging.getLogger("dagster").propagate = False


@dg.definitions
def defs() -> dg.Definitions:
    return dg.load_from_defs_folder(path_within_project=Path(__file__).parent)
