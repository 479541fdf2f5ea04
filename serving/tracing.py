"""OpenTelemetry traces of serving: one server span per request (continuing the caller's W3C
`traceparent` when it sends one) with child spans for the feature fetch, the model and the
response, and the request ids and model version as attributes.

Spans are exported over OTLP/HTTP when an endpoint is configured (OTEL_EXPORTER_OTLP_ENDPOINT
of the deploying process, passed to the replica in ServingConfig, since a replica does not
inherit the deployer's environment); without one they are still made, so every response can
name its trace id, and dropped.

Why hand-made spans rather than opentelemetry-instrumentation-fastapi/-redis: the FastAPI
instrumentation wraps the app in its own ASGI middleware and reads the route from Starlette's
scope, which works under Serve too, but it adds a span per ASGI send/receive event (3 per
request) and a second middleware layer on the hot path; the Redis instrumentation patches the
client class process-wide. One middleware of ours (serving.app.Edge) does the server span and the
response headers, and the three spans the issue asks for are explicit where the work is.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.propagators.textmap import Getter
from opentelemetry.sdk.trace import TracerProvider

from easymlops.telemetry import PROPAGATOR, new_tracer_provider, traceparent

__all__ = ["ASGI_HEADERS", "PROPAGATOR", "SERVICE_NAME", "traceparent", "tracer_provider"]

SERVICE_NAME = "easymlops-serving"


def tracer_provider(otlp_endpoint: str = "") -> TracerProvider:
    """Serving's provider; the endpoint comes from ServingConfig, since a replica does not
    inherit the deploying process's environment."""
    return new_tracer_provider(SERVICE_NAME, otlp_endpoint)


class _AsgiHeaders(Getter[Mapping[str, str]]):
    def get(self, carrier: Mapping[str, str], key: str) -> list[str] | None:
        value = carrier.get(key.lower())
        return [value] if value is not None else None

    def keys(self, carrier: Mapping[str, str]) -> list[str]:
        return list(carrier)


ASGI_HEADERS = _AsgiHeaders()
