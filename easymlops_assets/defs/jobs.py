"""Jobs over the asset graph."""

import dagster as dg

from easymlops_assets.defs.lakehouse.freshness import FRESHNESS_CHECKS

# Freshness checks judge the instance's history, not a run's output: excluded from the jobs
# that build assets (see lakehouse/freshness.py).
FRESHNESS = dg.AssetSelection.checks(*FRESHNESS_CHECKS)

# Everything materializable, from Kafka landing to the serving deployment (the Kafka topics
# themselves are external assets and are excluded automatically). Its daily partitioned assets
# need a partition or a range (tags dagster/asset_partition_range_start/end): `easymlops demo`
# passes the dates bronze holds (easymlops.pipeline).
full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all() - FRESHNESS,
    description=(
        "Land Kafka, build lake and gold tables, refresh the online store, retrain, gate, serve."
    ),
)

# Landing alone: what the pipeline runs first to learn which dates bronze holds.
land_kafka = dg.define_asset_job(
    "land_kafka",
    selection=dg.AssetSelection.assets("bronze_events", "bronze_invalid_events") - FRESHNESS,
    description="Land events.validated and events.invalid into bronze up to their end offsets.",
)

# Silver and every gold model for some dates: what the late-events sensor requests and what a
# backfill of a date range runs.
lakehouse_refresh = dg.define_asset_job(
    "lakehouse_refresh",
    selection=(dg.AssetSelection.assets("silver_events") | dg.AssetSelection.groups("warehouse"))
    - FRESHNESS,
    description="Rebuild the silver partitions of some dates and the gold models over them.",
)

check_freshness = dg.define_asset_job(
    "check_freshness",
    selection=FRESHNESS,
    description="Evaluate the freshness check of bronze_events (a landing in the last hour).",
)
