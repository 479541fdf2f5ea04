"""Prometheus metrics of one serving replica, exposed at GET /metrics.

A private CollectorRegistry (not prometheus_client's global one) so that metrics are only ours
and building a second instance in one process (tests) does not fail on duplicate names. Each
replica reports itself; with several replicas, scrape them individually or use Ray's metrics.

Reach the replica's instance through `serving_metrics()`, never a module-level object: Serve
pickles the ingress class (and with it the FastAPI app) by value, so a module global referenced
from the endpoints and from the middleware would arrive in the replica as two separate copies,
while a function of this importable module is pickled by reference and returns one instance.
"""

from __future__ import annotations

import gc
import time
from functools import cache
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST
# Sub-millisecond to seconds: a warm /predict is ~1-5 ms, a cold Redis connect far more.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# A young collection in a replica under load took ~0.5 ms, a full one of the frozen heap 1-2 ms,
# one over an unfrozen start-up heap ~230 ms (benchmarks/README.md, "The soak's tail").
GC_PAUSE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "easymlops_serving_requests",
            "HTTP requests by endpoint and status code",
            ["endpoint", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "easymlops_serving_request_latency_seconds",
            "HTTP request latency inside the replica",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.predictions = Counter(
            "easymlops_serving_predictions",
            "Rows scored, by model version",
            ["model_name", "model_version"],
            registry=self.registry,
        )
        # One observation per model call: 1 for a lone /predict, the batch's size for
        # /predict/batch or under @serve.batch (ServingConfig.batch_max_size).
        self.model_call_rows = Histogram(
            "easymlops_serving_model_call_rows",
            "Rows scored per model call",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 1000),
            registry=self.registry,
        )
        self.missing_features = Counter(
            "easymlops_serving_missing_features",
            "Features absent from the online store at prediction time",
            ["feature"],
            registry=self.registry,
        )
        self.predictions_logged = Counter(
            "easymlops_serving_predictions_log",
            "Predictions sent to the predictions topic, by delivery outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.predictions_log_dropped = Counter(
            "easymlops_serving_predictions_log_dropped",
            "Predictions not logged because the bounded send queue was full (broker away)",
            registry=self.registry,
        )
        self.model_info = Gauge(
            "easymlops_serving_model_info",
            "1 for the model version being served",
            ["model_name", "model_version", "feature_set_version"],
            registry=self.registry,
        )
        # Every request in the replica waits while the cyclic GC runs: the soak's tail.
        self.gc_pause = Histogram(
            "easymlops_serving_gc_pause_seconds",
            "Cyclic garbage collections in the replica process and how long each took",
            ["generation"],
            buckets=GC_PAUSE_BUCKETS,
            registry=self.registry,
        )
        self._gc_pause_by_generation = [self.gc_pause.labels(str(g)) for g in range(3)]
        self._gc_started = 0.0
        self._served: tuple[str, str, str] | None = None

    def time_gc(self, phase: str, info: dict[str, Any]) -> None:
        """A `gc.callbacks` hook: one observation per collection (a few µs each)."""
        if phase == "start":
            self._gc_started = time.perf_counter()
        else:
            paused = time.perf_counter() - self._gc_started
            self._gc_pause_by_generation[info["generation"]].observe(paused)

    def set_model(self, name: str, version: str, feature_set_version: str) -> None:
        """Keep exactly one model_info series, the one in service."""
        labels = (name, version, feature_set_version)
        if labels == self._served:
            return
        if self._served is not None:
            self.model_info.remove(*self._served)
        self.model_info.labels(*labels).set(1)
        self._served = labels

    def render(self) -> bytes:
        return generate_latest(self.registry)


@cache
def serving_metrics() -> ServingMetrics:
    """The metrics of this process (one Serve replica)."""
    # `*_created` timestamp series double the output for no use here; the switch is
    # process-wide, which is fine inside a replica.
    disable_created_metrics()
    metrics = ServingMetrics()
    gc.callbacks.append(metrics.time_gc)
    return metrics
