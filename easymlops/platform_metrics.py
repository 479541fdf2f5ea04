"""Platform metrics for Prometheus, like kafka-lag-exporter: consumer lag, lake freshness and row
counts, feature drift and live AUC, read from where they live and served on one HTTP port.

    python -m easymlops.platform_metrics --port 19464

Each source is read by a thread of its own, every `interval` seconds (drift, live AUC and the
registry every `model_interval`), and a scrape answers the last values at once: a broker that
does not answer never holds up a scrape, nor the other sources. A source that fails keeps no
stale values: its series disappear, `easymlops_platform_scrape_error{source}` is 1, and the
cause is logged.

Sources:
- `kafka`: lag of the validators' consumer groups (end offset - committed offset, per topic and
  partition). The Python validator commits its group's offsets in its transactions; the Flink
  job commits its group's on each checkpoint. A group that never committed has no series.
- `landing`: lag of the lake landing (easymlops.lake.land_topic), whose offsets are not a
  group's but the Delta log's (committed with the data): end offset - landed offset, reported
  under the landing's group id. A table not created yet has landed nothing.
- `lake`: time of the last commit of each bronze table and rows per layer, from the Delta log's
  metadata (bronze) and the Parquet footers (silver): no data is scanned.
- `drift`: PSI per feature and of the score, on the newest day of cart_scores against the
  reference of the version that scored it: the same computation as the `feature_drift` asset
  (easymlops.drift), whose results are Dagster metadata, not a table. The warn and fail
  thresholds are exported too, so the alert rules compare with the settings' values.
- `live`: live AUC per model version on the newest day of logged predictions that has mature
  labels (easymlops.live, as the `live_performance` asset), and the margin the settings allow.
- `registry`: each of those versions' offline test AUC (MLflow; cached: a version's run does
  not change).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from easymlops.settings import Settings, get_settings

log = logging.getLogger("easymlops.platform_metrics")

DEFAULT_PORT = 19464
SOURCES = ("kafka", "landing", "lake", "drift", "live", "registry")
# Sources read every `interval`; the others (warehouse and model reads) every `model_interval`.
FAST_SOURCES = frozenset({"kafka", "landing", "lake"})

# The Flink validation job's default group (flink_jobs/validation_job.py, DEFAULT_GROUP_ID; that
# module imports PyFlink, so it is not imported here: tests/test_platform_metrics.py holds the
# two equal).
FLINK_GROUP_ID = "easymlops-flink-validator"

# The bronze tables the landing fills: (lake.land_topic's kind, Settings topic field, table).
LANDINGS: tuple[tuple[str, str, str], ...] = (
    ("validated", "topic_validated", "events"),
    ("invalid", "topic_invalid", "invalid_events"),
    ("predictions", "topic_predictions", "predictions"),
)


def landing_group(kind: str) -> str:
    """The group id lake.land_topic's consumer uses (it commits no offset to it)."""
    return f"easymlops-lake-{kind}"


@dataclass(frozen=True)
class MetricSpec:
    name: str
    help: str
    labels: tuple[str, ...]


# Every series this exporter can answer (tests/test_dashboards.py reads this: a dashboard or an
# alert may use only these). Units as the OTel names of the platform: a suffix for seconds, none
# for counts of records or rows.
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "easymlops_kafka_consumer_lag",
            "Records of the partition the consumer group has not processed yet (end - committed).",
            ("group", "topic", "partition"),
        ),
        MetricSpec(
            "easymlops_kafka_consumer_committed_offset",
            "Next offset the consumer group will process (committed or landed).",
            ("group", "topic", "partition"),
        ),
        MetricSpec(
            "easymlops_kafka_end_offset",
            "Next offset to be written to the partition.",
            ("topic", "partition"),
        ),
        MetricSpec(
            "easymlops_lake_last_commit_timestamp_seconds",
            "Unix time of the bronze table's last Delta commit (its last landing).",
            ("table", "topic"),
        ),
        MetricSpec(
            "easymlops_lake_rows",
            "Rows of a lake table, from the Delta log (bronze) or the Parquet footers (silver).",
            ("layer", "table"),
        ),
        MetricSpec(
            "easymlops_model_feature_psi",
            "PSI of a feature (or the score, feature=probability) on the newest day of "
            "cart_scores against the training reference of the version that scored it.",
            ("feature", "model_version"),
        ),
        MetricSpec(
            "easymlops_model_drift_day_timestamp_seconds",
            "Unix time (midnight UTC) of the day the PSI values are of.",
            (),
        ),
        MetricSpec(
            "easymlops_model_psi_threshold",
            "PSI thresholds of the settings (EASYMLOPS_DRIFT_PSI_WARN / _FAIL).",
            ("level",),
        ),
        MetricSpec(
            "easymlops_model_live_auc",
            "AUC of the version's logged predictions of the newest day with mature labels.",
            ("model_version",),
        ),
        MetricSpec(
            "easymlops_model_live_labelled_predictions",
            "Logged predictions with a mature label behind easymlops_model_live_auc.",
            ("model_version",),
        ),
        MetricSpec(
            "easymlops_model_live_auc_margin",
            "How far live AUC may fall below the offline test AUC (EASYMLOPS_LIVE_AUC_MARGIN).",
            (),
        ),
        MetricSpec(
            "easymlops_model_offline_auc",
            "Test AUC of the version's training run (MLflow).",
            ("model_version",),
        ),
        MetricSpec(
            "easymlops_platform_scrape_error",
            "1 when the source's last read failed (the cause is in the exporter's log).",
            ("source",),
        ),
        MetricSpec(
            "easymlops_platform_scrape_duration_seconds",
            "Seconds the source's last read took.",
            ("source",),
        ),
        MetricSpec(
            "easymlops_platform_scrape_timestamp_seconds",
            "Unix time of the source's last read.",
            ("source",),
        ),
    )
}


class Families:
    """Gauge families of one read, built from METRICS by name."""

    def __init__(self) -> None:
        self._by_name: dict[str, GaugeMetricFamily] = {}

    def add(self, name: str, value: float, **labels: object) -> None:
        spec = METRICS[name]
        if name not in self._by_name:
            self._by_name[name] = GaugeMetricFamily(name, spec.help, labels=list(spec.labels))
        self._by_name[name].add_metric([str(labels[label]) for label in spec.labels], value)

    def __iter__(self) -> Any:
        return iter(self._by_name.values())


# ---- the sources ---------------------------------------------------------------------------------


def read_group_lag(
    settings: Settings, consumers: Sequence[tuple[str, str]], timeout: float, out: Families
) -> None:
    from confluent_kafka import TopicPartition

    from easymlops import kafka

    ends_by_topic: dict[str, dict[int, int]] = {}
    for group, topic in consumers:
        if topic not in ends_by_topic:
            ends_by_topic[topic] = kafka.end_offsets(settings, topic, timeout)
            for part, end in ends_by_topic[topic].items():
                out.add("easymlops_kafka_end_offset", end, topic=topic, partition=part)
        ends = ends_by_topic[topic]
        probe = kafka.consumer(settings, group)  # committed() only: it never joins the group
        try:
            committed = kafka.committed_offsets(
                probe, [TopicPartition(topic, p) for p in sorted(ends)], timeout=timeout
            )
        finally:
            probe.close()
        for tp in committed:
            if tp.offset < 0:
                continue  # nothing committed for this partition
            lag = max(ends[tp.partition] - tp.offset, 0)
            labels = {"group": group, "topic": topic, "partition": tp.partition}
            out.add("easymlops_kafka_consumer_committed_offset", tp.offset, **labels)
            out.add("easymlops_kafka_consumer_lag", lag, **labels)


def read_landing_lag(settings: Settings, timeout: float, out: Families) -> None:
    from easymlops import kafka, lake

    for kind, field, table in LANDINGS:
        topic = getattr(settings, field)
        ends = kafka.end_offsets(settings, topic, timeout)
        incarnation = kafka.topic_id(settings, topic, timeout)
        landed = lake.landed_offsets(
            lake.bronze_path(settings, table), topic, incarnation, sorted(ends)
        )
        for part, end in ends.items():
            labels = {"group": landing_group(kind), "topic": topic, "partition": part}
            out.add("easymlops_kafka_consumer_committed_offset", landed[part], **labels)
            out.add("easymlops_kafka_consumer_lag", max(end - landed[part], 0), **labels)


def read_lake(settings: Settings, out: Families) -> None:
    import pyarrow.dataset as ds
    import pyarrow.fs as pafs
    from deltalake import DeltaTable

    from easymlops import lake, s3

    for _kind, field, table in LANDINGS:
        path = lake.bronze_path(settings, table)
        if not DeltaTable.is_deltatable(path):
            continue  # nothing landed yet: no series (the landing lag says what waits)
        delta = DeltaTable(path)
        last = delta.history(1)[0]
        out.add(
            "easymlops_lake_last_commit_timestamp_seconds",
            last["timestamp"] / 1000,
            table=table,
            topic=getattr(settings, field),
        )
        actions = delta.get_add_actions(flatten=True)
        column = actions.column("num_records")
        rows = sum(v for v in column.to_pylist() if v is not None)
        out.add("easymlops_lake_rows", rows, layer="bronze", table=table)
    uri = lake.silver_events_path(settings)
    fs, root = s3.filesystem(uri)
    if fs.get_file_info(root).type == pafs.FileType.Directory:
        dataset = ds.dataset(root, filesystem=fs, format="parquet", partitioning="hive")
        out.add("easymlops_lake_rows", dataset.count_rows(), layer="silver", table="events")


def read_drift(settings: Settings, out: Families) -> set[str]:
    """The newest day of cart_scores against its version's reference; returns the versions."""
    from easymlops import drift, warehouse
    from easymlops.features import MODEL_FEATURES

    out.add("easymlops_model_psi_threshold", settings.drift_psi_warn, level="warn")
    out.add("easymlops_model_psi_threshold", settings.drift_psi_fail, level="fail")
    with warehouse.reader(settings) as r:
        day = r.rows("select max(event_date) from cart_scores")[0][0]
        if day is None:
            return set()
        current = r.frame("select * from cart_scores where event_date = ?", [day])
    # As the feature_drift asset: the reference of the version that scored the day.
    version = str(max(current["model_version"].unique().to_list(), key=int))
    reference = drift.read_reference(settings, version)
    for result in drift.compare(reference, current, (*MODEL_FEATURES, "probability")):
        out.add(
            "easymlops_model_feature_psi", result.psi, feature=result.name, model_version=version
        )
    midnight = datetime.combine(day, datetime.min.time(), tzinfo=UTC)
    out.add("easymlops_model_drift_day_timestamp_seconds", midnight.timestamp())
    return {version}


# Days of logged predictions looked at, newest first: labels mature some time after the
# prediction, so the newest day often has none yet.
LIVE_DAYS = 3
# Bootstrap resamples of the live AUC's interval: only the estimate is exported.
LIVE_RESAMPLES = 50


def read_live(settings: Settings, out: Families) -> set[str]:
    import polars as pl
    from deltalake import DeltaTable

    from easymlops import lake, live

    out.add("easymlops_model_live_auc_margin", settings.live_auc_margin)
    path = lake.bronze_path(settings, "predictions")
    if not DeltaTable.is_deltatable(path):
        return set()
    newest = pl.scan_delta(path).select(pl.col("scored_at").max().dt.date()).collect().item()
    if newest is None:
        return set()
    quick = settings.model_copy(update={"gate_bootstrap": LIVE_RESAMPLES})
    done: set[str] = set()
    for back in range(LIVE_DAYS):
        day: date = newest - timedelta(days=back)
        for result in live.performance(quick, day):
            auc = result.metrics.get("test_auc")
            if auc is None or result.model_version in done:
                continue
            done.add(result.model_version)
            out.add("easymlops_model_live_auc", auc, model_version=result.model_version)
            out.add(
                "easymlops_model_live_labelled_predictions",
                result.labelled,
                model_version=result.model_version,
            )
    return done


# ---- the exporter --------------------------------------------------------------------------------


@dataclass
class Reading:
    families: list[Metric]
    error: bool
    duration: float
    at: float


class Exporter(Collector):
    """Reads each source on its own thread and answers the last readings on a scrape."""

    def __init__(
        self,
        settings: Settings,
        *,
        sources: Iterable[str] = SOURCES,
        consumers: Sequence[tuple[str, str]] | None = None,
        interval: float = 15.0,
        model_interval: float = 300.0,
        kafka_timeout: float = 5.0,
    ) -> None:
        from easymlops.validate import GROUP_ID

        self.settings = settings
        self.sources = [s for s in SOURCES if s in set(sources)]
        unknown = set(sources) - set(SOURCES)
        if unknown:
            raise ValueError(f"unknown sources {sorted(unknown)}; known: {', '.join(SOURCES)}")
        self.consumers = list(
            consumers
            if consumers is not None
            else [(GROUP_ID, settings.topic_raw), (FLINK_GROUP_ID, settings.topic_raw)]
        )
        self.interval = interval
        self.model_interval = model_interval
        self.kafka_timeout = kafka_timeout
        self._readings: dict[str, Reading] = {}
        # Versions seen by drift and live: the registry source reads their offline AUC.
        self._versions: set[str] = set()
        self._offline_auc: dict[str, float | None] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    # -- reading
    def _read(self, source: str, out: Families) -> None:
        s = self.settings
        if source == "kafka":
            read_group_lag(s, self.consumers, self.kafka_timeout, out)
        elif source == "landing":
            read_landing_lag(s, self.kafka_timeout, out)
        elif source == "lake":
            read_lake(s, out)
        elif source == "drift":
            versions = read_drift(s, out)
            with self._lock:
                self._versions |= versions
        elif source == "live":
            versions = read_live(s, out)
            with self._lock:
                self._versions |= versions
        elif source == "registry":
            self._read_registry(out)

    def _read_registry(self, out: Families) -> None:
        from mlflow.exceptions import MlflowException

        from easymlops import registry

        with self._lock:
            versions = sorted(self._versions)
        for version in versions:
            if version not in self._offline_auc:
                try:
                    metrics = registry.version_metrics(version, self.settings)
                except MlflowException as exc:
                    if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                        raise
                    metrics = {}  # deleted from the registry since: no offline AUC to compare
                self._offline_auc[version] = metrics.get("test_auc")
            auc = self._offline_auc[version]
            if auc is not None:
                out.add("easymlops_model_offline_auc", auc, model_version=version)

    def refresh(self, source: str) -> Reading:
        """Read one source now; a failure is logged and kept as an error reading."""
        started = time.monotonic()
        out = Families()
        error = False
        try:
            self._read(source, out)
        except Exception as exc:
            error = True
            log.warning(
                "platform metrics: reading %s failed: %s: %s", source, type(exc).__name__, exc
            )
        reading = Reading(
            families=[] if error else list(out),
            error=error,
            duration=time.monotonic() - started,
            at=time.time(),
        )
        with self._lock:
            self._readings[source] = reading
        return reading

    def refresh_all(self) -> dict[str, Reading]:
        return {source: self.refresh(source) for source in self.sources}

    def _loop(self, source: str) -> None:
        every = self.interval if source in FAST_SOURCES else self.model_interval
        while not self._stop.is_set():
            self.refresh(source)
            self._stop.wait(every)

    def start(self) -> None:
        """One reading thread per source (daemon threads; `stop` ends them)."""
        for source in self.sources:
            thread = threading.Thread(
                target=self._loop, args=(source,), name=f"platform-metrics-{source}", daemon=True
            )
            thread.start()
            self._threads.append(thread)

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)

    # -- answering
    def collect(self) -> Iterable[Metric]:
        with self._lock:
            readings = dict(self._readings)
        merged: dict[str, GaugeMetricFamily] = {}
        status = Families()
        for source, reading in readings.items():
            for family in reading.families:
                # kafka and landing both give consumer lag: one family per name.
                if family.name in merged:
                    merged[family.name].samples.extend(family.samples)
                else:
                    copy = GaugeMetricFamily(family.name, family.documentation)
                    copy.samples = list(family.samples)
                    merged[family.name] = copy
            status.add("easymlops_platform_scrape_error", int(reading.error), source=source)
            status.add(
                "easymlops_platform_scrape_duration_seconds", reading.duration, source=source
            )
            status.add("easymlops_platform_scrape_timestamp_seconds", reading.at, source=source)
        yield from merged.values()
        yield from status

    def serve(self, port: int, addr: str) -> Callable[[], None]:
        """Start the readers and the HTTP server (/metrics); returns a function that stops both."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        server, thread = start_http_server(port, addr=addr, registry=registry)
        self.start()

        def shutdown() -> None:
            server.shutdown()
            server.server_close()
            thread.join(5)
            self.stop()

        return shutdown


def parse_consumer(value: str) -> tuple[str, str]:
    group, sep, topic = value.partition("=")
    if not sep or not group or not topic:
        raise argparse.ArgumentTypeError(f"expected GROUP=TOPIC, got {value!r}")
    return group, topic


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m easymlops.platform_metrics",
        description="Serve the platform's consumer lag, lake freshness, drift and live AUC as "
        "Prometheus metrics (GET /metrics).",
    )
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help="HTTP port (%(default)s)")
    parser.add_argument(
        "--host",
        default=None,
        help="address to bind (default: EASYMLOPS_BIND_HOST, else EASYMLOPS_HOST)",
    )
    parser.add_argument(
        "--source",
        action="append",
        choices=SOURCES,
        help="read only these sources (repeatable; default: all)",
    )
    parser.add_argument(
        "--consumer",
        action="append",
        type=parse_consumer,
        metavar="GROUP=TOPIC",
        help="consumer groups whose lag to report (repeatable; default: the Python "
        "validator's and the Flink job's groups on the raw topic)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=15.0,
        help="seconds between reads of kafka, landing and lake (%(default)s)",
    )
    parser.add_argument(
        "--model-interval",
        type=float,
        default=300.0,
        help="seconds between reads of drift, live and registry (%(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    settings = get_settings()
    exporter = Exporter(
        settings,
        sources=args.source or SOURCES,
        consumers=args.consumer,
        interval=args.interval,
        model_interval=args.model_interval,
    )
    host = args.host or settings.listen_host
    exporter.serve(args.port, host)
    log.info(
        "platform metrics on http://%s:%d/metrics (sources: %s)",
        host,
        args.port,
        ", ".join(exporter.sources),
    )
    with contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()


if __name__ == "__main__":
    main()
