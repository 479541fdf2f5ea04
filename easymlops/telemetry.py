"""OpenTelemetry metrics for long-running parts (validator, ...): OTLP over HTTP when
`OTEL_EXPORTER_OTLP_ENDPOINT` is set (the collector in infra/ forwards to Prometheus), the
console when `EASYMLOPS_OTEL_CONSOLE=1`, otherwise recorded but not exported."""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry import metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource

_configured = False


def configure_metrics(
    service_name: str = "easymlops", extra_readers: Sequence[MetricReader] = ()
) -> None:
    """Install the process's meter provider once (OTel allows a single global provider).

    `extra_readers` lets tests read what was recorded (InMemoryMetricReader)."""
    global _configured
    if _configured:
        return
    readers: list[MetricReader] = list(extra_readers)
    if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    if os.environ.get("EASYMLOPS_OTEL_CONSOLE") == "1":
        readers.append(PeriodicExportingMetricReader(ConsoleMetricExporter()))
    provider = MeterProvider(
        metric_readers=readers, resource=Resource.create({"service.name": service_name})
    )
    metrics.set_meter_provider(provider)
    _configured = True


def meter(name: str) -> metrics.Meter:
    return metrics.get_meter(name)
