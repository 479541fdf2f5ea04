"""OpenTelemetry for the pipeline's processes (producer, validator, ...).

Metrics: OTLP over HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (the collector in infra/
forwards to Prometheus), the console when `EASYMLOPS_OTEL_CONSOLE=1`, otherwise recorded but not
exported.

Traces: an event's trace starts where it is produced; the producer puts the W3C `traceparent`
of its span in each record's Kafka headers, and the validator continues that trace with a span
per batch and upstream trace. Exported over OTLP/HTTP when `OTEL_EXPORTER_OTLP_ENDPOINT` is
set; otherwise spans are made and dropped. Serving has its own provider (serving/tracing.py)."""

from __future__ import annotations

import os
from collections.abc import Sequence

from opentelemetry import metrics, trace
from opentelemetry.context import Context
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    MetricReader,
    PeriodicExportingMetricReader,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

#: The W3C trace-context header, as a Kafka record header name too.
TRACEPARENT = "traceparent"
PROPAGATOR = TraceContextTextMapPropagator()
_tracer_provider: TracerProvider | None = None

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


def new_tracer_provider(service_name: str, otlp_endpoint: str = "") -> TracerProvider:
    """A provider of our own (not OTel's process-global one, which can be set only once):
    spans exported over OTLP/HTTP to `otlp_endpoint` (the collector's base URL), else to
    OTEL_EXPORTER_OTLP_ENDPOINT when set, else made and dropped."""
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        # An explicit endpoint is the whole URL; the variable is a base the exporter extends.
        exporter = (
            OTLPSpanExporter(endpoint=otlp_endpoint.rstrip("/") + "/v1/traces")
            if otlp_endpoint
            else OTLPSpanExporter()
        )
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def tracer_provider() -> TracerProvider:
    """The process's provider for pipeline traces; tests swap it with `use_tracer_provider`."""
    global _tracer_provider
    if _tracer_provider is None:
        _tracer_provider = new_tracer_provider("easymlops")
    return _tracer_provider


def use_tracer_provider(provider: TracerProvider | None) -> None:
    """Make `provider` the pipeline's (None: back to the one built from the environment)."""
    global _tracer_provider
    _tracer_provider = provider


def tracer(name: str) -> trace.Tracer:
    return tracer_provider().get_tracer(name)


def traceparent(span: trace.Span) -> str:
    """The W3C header naming `span`."""
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def continued_from(header: bytes | str) -> Context:
    """The context a `traceparent` header value names (empty when it is malformed)."""
    value = header.decode("ascii", "replace") if isinstance(header, bytes) else header
    return PROPAGATOR.extract({TRACEPARENT: value})
