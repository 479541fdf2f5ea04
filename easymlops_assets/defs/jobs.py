"""Jobs over the asset graph."""

import dagster as dg

# Everything materializable, from Kafka landing to the serving deployment (the Kafka topics
# themselves are external assets and are excluded automatically).
full_pipeline = dg.define_asset_job(
    "full_pipeline",
    selection=dg.AssetSelection.all(),
    description=(
        "Land Kafka, build lake and gold tables, refresh the online store, retrain, gate, serve."
    ),
)
