"""Kafka topics as external assets: produced and validated outside the asset graph."""

import dagster as dg

from easymlops.settings import get_settings

# Topic names are in the specs' descriptions and metadata: definition-time values, read when the
# code location loads (not from a run-time resource).
_settings = get_settings()

events_raw = dg.AssetSpec(
    "events_raw",
    group_name="ingestion",
    kinds={"kafka"},
    description=f"Raw events on Kafka topic `{_settings.topic_raw}` (producers, CSV replay).",
    metadata={"topic": _settings.topic_raw},
)
events_validated = dg.AssetSpec(
    "events_validated",
    deps=[events_raw],
    group_name="ingestion",
    kinds={"kafka"},
    description=(
        f"Events that passed the rules in easymlops.schema, on `{_settings.topic_validated}`; "
        "written by the stream validator (Flink in production, `easymlops validate` locally)."
    ),
    metadata={"topic": _settings.topic_validated},
)
events_invalid = dg.AssetSpec(
    "events_invalid",
    deps=[events_raw],
    group_name="ingestion",
    kinds={"kafka"},
    description=f"Dead-letter envelopes of rejected events on `{_settings.topic_invalid}`.",
    metadata={"topic": _settings.topic_invalid},
)
predictions = dg.AssetSpec(
    "predictions",
    group_name="ingestion",
    kinds={"kafka"},
    description=(
        f"Every prediction served (request id, model version, features used, probability) on "
        f"`{_settings.topic_predictions}`; written by Ray Serve (serving/prediction_log.py)."
    ),
    metadata={"topic": _settings.topic_predictions},
)
