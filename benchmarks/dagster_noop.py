"""The platform's code location plus one asset that does nothing, for `benchmarks/dagster_runs.py`:
a run of `noop` pays exactly what any one-asset run of the platform pays before and after its
work (loading the code location, starting the executor and the step), and no work."""

import dagster as dg

import easymlops_assets.definitions as platform  # a module: one @dg.definitions in this scope


@dg.asset(group_name="benchmark", description="Does nothing; measures run and step start-up.")
def noop() -> None:
    return None


@dg.definitions
def defs() -> dg.Definitions:
    return dg.Definitions.merge(platform.defs(), dg.Definitions(assets=[noop]))
