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
# Predictions land only through bronze_predictions_sensor (see lakehouse/sensors.py).
PREDICTIONS = dg.AssetSelection.assets("bronze_predictions")
# Scores, drift and live performance of days *after* a model's training: a retraining run
# would compare the model's own training days with themselves (see `monitoring`).
MONITORING = dg.AssetSelection.groups("monitoring")

full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all() - FRESHNESS - PREDICTIONS - MONITORING,
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

# What the daily schedule refreshes: the landing, silver and gold partitions of the newest days
# and the online store, no retraining.
daily_refresh = dg.define_asset_job(
    "daily_refresh",
    selection=(
        dg.AssetSelection.assets("bronze_events", "bronze_invalid_events", "silver_events")
        | dg.AssetSelection.groups("warehouse")
        | dg.AssetSelection.assets("online_features")
        | MONITORING
    )
    - FRESHNESS,
    description="Land Kafka, rebuild the newest silver and gold partitions, refresh Redis, "
    "score the days' carts with the champion, measure drift and live performance.",
)

# The champion's scores, drift and live performance for some dates (after their silver and
# gold partitions exist): what `easymlops pipeline` runs on new data before retraining.
monitoring = dg.define_asset_job(
    "monitoring",
    selection=MONITORING,
    description="Score the dates' carts with the champion, measure drift and live performance.",
)

# The checks of serving_deployment alone: what the MLflow sensor runs after an alias moved by
# hand (serving follows the champion, answers, and still matches training).
verify_serving = dg.define_asset_job(
    "verify_serving",
    selection=dg.AssetSelection.checks_for_assets(dg.AssetKey("serving_deployment")),
    description="Check that serving answers with the champion and matches training.",
)
