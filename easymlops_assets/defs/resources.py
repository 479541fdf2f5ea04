"""The platform's configuration resources (easymlops_assets/resources.py), from the environment."""

import dagster as dg

from easymlops_assets.resources import platform_resources


@dg.definitions
def resources() -> dg.Definitions:
    return dg.Definitions(resources=platform_resources())
