"""The platform metrics exporter (easymlops/platform_metrics.py) against real parts: a broker
(Tansu, then Apache Kafka) with records produced and a group's offsets committed, Delta tables
written with the landing's own application transactions, a DuckDB warehouse with cart_scores and
training_set, a drift reference written by easymlops.drift, MLflow's stores; scraped over HTTP as
Prometheus would."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import duckdb
import httpx
import numpy as np
import polars as pl
import pytest
from prometheus_client.parser import text_string_to_metric_families

from easymlops import drift, lake, platform_metrics
from easymlops.features import MODEL_FEATURES
from easymlops.settings import Settings
from easymlops.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
DAY = date(2026, 11, 30)
PARTITIONS = 3

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
Start = Callable[[platform_metrics.Exporter], tuple[int, Samples]]


def scrape(port: int) -> Samples:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: object) -> float | None:
    return samples.get((name, frozenset((k, str(v)) for k, v in labels.items())))


def names(samples: Samples) -> set[str]:
    return {name for name, _ in samples}


@pytest.fixture
def exporter_on() -> Iterator[Start]:
    """Start an exporter's readers and HTTP server; wait until every source was read once."""
    stops = []

    def start(exporter: platform_metrics.Exporter) -> tuple[int, Samples]:
        port = free_port()
        stops.append(exporter.serve(port, "127.0.0.1"))
        deadline = time.monotonic() + 60
        while True:
            samples = scrape(port)
            read = {
                dict(labels)["source"]
                for name, labels in samples
                if name == "easymlops_platform_scrape_timestamp_seconds"
            }
            if read >= set(exporter.sources):
                return port, samples
            assert time.monotonic() < deadline, f"sources read: {read}"
            time.sleep(0.2)

    yield start
    for stop in stops:
        stop()


# ---- what the tests plant -----------------------------------------------------------------------


def plant_warehouse(settings: Settings, version: str = "3") -> dict[str, float]:
    """cart_scores of two days (the newest with `price` shifted), the version's drift reference,
    and training_set labels; returns the PSI easymlops.drift computes for the newest day."""
    rng = np.random.default_rng(7)
    columns = (*MODEL_FEATURES, "probability")

    def frame(rows: int, price_mean: float) -> pl.DataFrame:
        data = {name: rng.normal(10, 2, rows) for name in columns}
        data["price"] = rng.normal(price_mean, 10, rows)
        data["probability"] = rng.uniform(0, 1, rows)
        return pl.DataFrame(data)

    reference = frame(2000, 50)
    drift.write_reference(settings, version, reference)
    older = frame(500, 50).with_columns(
        pl.lit(version).alias("model_version"), pl.lit(DAY - timedelta(days=1)).alias("event_date")
    )
    newest = frame(500, 90).with_columns(
        pl.lit(version).alias("model_version"), pl.lit(DAY).alias("event_date")
    )
    settings.warehouse.parent.mkdir(parents=True, exist_ok=True)
    with duckdb.connect(str(settings.warehouse)) as con:
        con.register("scores", pl.concat([older, newest]).to_arrow())
        con.execute("create table cart_scores as select * from scores")
    return {d.name: d.psi for d in drift.compare(reference, newest, columns)}


def plant_predictions(settings: Settings, version: str = "3") -> float:
    """Logged predictions of DAY with mature labels in training_set; returns their AUC."""
    from deltalake import write_deltalake
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(11)
    rows = 400
    labels = rng.uniform(size=rows) < 0.3
    probability = np.clip(np.where(labels, 0.6, 0.4) + rng.normal(0, 0.25, rows), 0, 1)
    scored = datetime.combine(DAY, datetime.min.time()) + timedelta(hours=12)
    predictions = pl.DataFrame(
        {
            "request_id": [f"r{i}" for i in range(rows)],
            "predicted_at": [scored] * rows,
            "model_name": ["purchase_propensity"] * rows,
            "model_version": [version] * rows,
            "event_id": [f"e{i}" for i in range(rows)],
            "cart_event_time": [scored] * rows,
            "scored_at": [scored] * rows,
            "user_id": list(range(rows)),
            "product_id": list(range(rows)),
            "user_session": [f"s{i}" for i in range(rows)],
            "features": ["{}"] * rows,
            "probability": probability.tolist(),
        },
        schema=lake.PREDICTION_COLUMNS,
    )
    write_deltalake(lake.bronze_path(settings, "predictions"), predictions.to_arrow())
    truth = pl.DataFrame({"event_id": [f"e{i}" for i in range(rows)], "label": labels.tolist()})
    with duckdb.connect(str(settings.warehouse)) as con:
        con.register("truth", truth.to_arrow())
        con.execute("create table training_set as select * from truth")
    return float(roc_auc_score(labels, probability))


def plant_bronze_events(settings: Settings, landed: dict[int, int], topic_id: str) -> int:
    """A bronze events table of two commits, the second with the landing's application
    transactions at `landed` (as lake.land_topic commits them); returns its rows."""
    from deltalake import CommitProperties, Transaction, write_deltalake

    path = lake.bronze_path(settings, "events")
    frame = pl.DataFrame({"event_id": ["a", "b", "c", "d"], "kafka_offset": [0, 1, 0, 1]})
    write_deltalake(path, frame.to_arrow())
    write_deltalake(
        path,
        frame.head(3).to_arrow(),
        mode="append",
        commit_properties=CommitProperties(
            app_transactions=[
                Transaction(lake.app_id(settings.topic_validated, topic_id, p), offset)
                for p, offset in landed.items()
            ]
        ),
    )
    return 7


def plant_silver(settings: Settings) -> int:
    directory = Path(lake.silver_events_path(settings)) / f"event_date={DAY}"
    directory.mkdir(parents=True)
    pl.DataFrame({"event_id": [f"x{i}" for i in range(5)]}).write_parquet(
        directory / "part-0.parquet"
    )
    return 5


# ---- tests --------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tansu", "kafka"])
def running_broker(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Settings]:
    """A broker alone, each in turn: the embedded Tansu and Apache Kafka (KRaft, from the jars
    of `make jars`), with the platform's topics of 3 partitions each."""
    from easymlops import stack
    from easymlops.kafka import ensure_topics

    settings = Settings(
        home=tmp_path_factory.mktemp(f"platform-metrics-{request.param}"),
        broker=request.param,
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        topic_partitions=PARTITIONS,
    )
    stack.up(settings, services=["kafka"])
    try:
        ensure_topics(settings)
        yield settings
    finally:
        stack.down(settings)


@pytest.mark.services
def test_lag_freshness_rows_drift_and_live_auc_as_prometheus_scrapes_them(
    running_broker: Settings, exporter_on: Start
) -> None:
    from confluent_kafka import Consumer, TopicPartition

    from easymlops.kafka import producer, topic_id
    from easymlops.validate import GROUP_ID

    settings = running_broker
    # 10 records per partition of the raw topic, 5 per partition of the validated one.
    client = producer(settings)
    for p in range(PARTITIONS):
        for i in range(10):
            client.produce(settings.topic_raw, value=f"raw-{p}-{i}".encode(), partition=p)
        for i in range(5):
            client.produce(settings.topic_validated, value=f"ok-{p}-{i}".encode(), partition=p)
    assert client.flush(30) == 0
    # The validator's group committed 4 of partition 0 and 7 of partition 1, nothing of 2.
    committer = Consumer({"bootstrap.servers": settings.bootstrap_servers, "group.id": GROUP_ID})
    committer.commit(
        offsets=[
            TopicPartition(settings.topic_raw, 0, 4),
            TopicPartition(settings.topic_raw, 1, 7),
        ],
        asynchronous=False,
    )
    committer.close()
    # The lake landed offsets 2, 5 and 0 of the validated topic (its Delta log says so).
    landed = {0: 2, 1: 5, 2: 0}
    bronze_rows = plant_bronze_events(
        settings, landed, topic_id(settings, settings.topic_validated)
    )
    silver_rows = plant_silver(settings)
    psi = plant_warehouse(settings)
    auc = plant_predictions(settings)

    before = time.time()
    exporter = platform_metrics.Exporter(
        settings,
        sources=[s for s in platform_metrics.SOURCES if s != "registry"],
        interval=0.5,
        model_interval=0.5,
    )
    port, samples = exporter_on(exporter)

    for source in exporter.sources:
        assert value(samples, "easymlops_platform_scrape_error", source=source) == 0, source
    lag = "easymlops_kafka_consumer_lag"
    raw, validated = settings.topic_raw, settings.topic_validated
    assert value(samples, lag, group=GROUP_ID, topic=raw, partition=0) == 10 - 4
    assert value(samples, lag, group=GROUP_ID, topic=raw, partition=1) == 10 - 7
    # Nothing committed: no series (not a lag of 10), and none for the Flink job's group.
    assert value(samples, lag, group=GROUP_ID, topic=raw, partition=2) is None
    assert not any(
        dict(labels).get("group") == platform_metrics.FLINK_GROUP_ID for _, labels in samples
    )
    for p in range(PARTITIONS):
        assert value(samples, "easymlops_kafka_end_offset", topic=raw, partition=p) == 10
        assert (
            value(samples, lag, group="easymlops-lake-validated", topic=validated, partition=p)
            == 5 - landed[p]
        )
        # Nothing landed of the invalid topic: its table does not exist.
        assert (
            value(
                samples,
                lag,
                group="easymlops-lake-invalid",
                topic=settings.topic_invalid,
                partition=p,
            )
            == 0
        )

    landed_at = value(
        samples, "easymlops_lake_last_commit_timestamp_seconds", table="events", topic=validated
    )
    assert landed_at is not None and before - 120 < landed_at <= time.time()
    assert value(samples, "easymlops_lake_rows", layer="bronze", table="events") == bronze_rows
    assert value(samples, "easymlops_lake_rows", layer="silver", table="events") == silver_rows
    assert value(samples, "easymlops_lake_rows", layer="bronze", table="invalid_events") is None

    exported_psi = {
        dict(labels)["feature"]: v
        for name, labels in samples
        if name == "easymlops_model_feature_psi"
        for v in [samples[(name, labels)]]
    }
    assert exported_psi.keys() == psi.keys()
    for feature, expected in psi.items():
        assert exported_psi[feature] == pytest.approx(expected), feature
    assert psi["price"] > settings.drift_psi_fail > psi["session_events"]
    assert value(samples, "easymlops_model_psi_threshold", level="fail") == settings.drift_psi_fail
    assert (
        value(samples, "easymlops_model_drift_day_timestamp_seconds")
        == datetime.combine(DAY, datetime.min.time(), tzinfo=UTC).timestamp()
    )

    assert value(samples, "easymlops_model_live_auc", model_version="3") == pytest.approx(auc)
    assert value(samples, "easymlops_model_live_labelled_predictions", model_version="3") == 400
    assert value(samples, "easymlops_model_live_auc_margin") == settings.live_auc_margin

    # Every series the exporter declares is answered (the registry's needs MLflow).
    assert names(samples) >= set(platform_metrics.METRICS) - {"easymlops_model_offline_auc"}

    # More records: the next read sees the lag grow.
    client.produce(raw, value=b"late", partition=0)
    assert client.flush(30) == 0
    deadline = time.monotonic() + 30
    while value(scrape(port), lag, group=GROUP_ID, topic=raw, partition=0) != 7:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_a_dead_broker_leaves_the_other_sources_answering(
    tmp_path: Path, exporter_on: Start
) -> None:
    closed = free_port()  # nothing listens there
    settings = Settings(home=tmp_path / "home", kafka_bootstrap=f"127.0.0.1:{closed}")
    plant_silver(settings)
    psi = plant_warehouse(settings)
    exporter = platform_metrics.Exporter(
        settings,
        sources=["kafka", "landing", "lake", "drift"],
        interval=0.5,
        model_interval=0.5,
        kafka_timeout=2.0,
    )
    started = time.monotonic()
    port, samples = exporter_on(exporter)
    assert value(samples, "easymlops_platform_scrape_error", source="kafka") == 1
    assert value(samples, "easymlops_platform_scrape_error", source="landing") == 1
    assert value(samples, "easymlops_platform_scrape_error", source="lake") == 0
    assert value(samples, "easymlops_platform_scrape_error", source="drift") == 0
    assert "easymlops_kafka_consumer_lag" not in names(samples)
    assert value(samples, "easymlops_lake_rows", layer="silver", table="events") == 5
    assert value(
        samples, "easymlops_model_feature_psi", feature="price", model_version="3"
    ) == pytest.approx(psi["price"])
    # A scrape answers at once while the broker reads keep failing.
    t = time.monotonic()
    assert value(scrape(port), "easymlops_platform_scrape_error", source="kafka") == 1
    assert time.monotonic() - t < 1.0
    assert time.monotonic() - started < 60


def test_a_missing_warehouse_is_an_error_of_its_own_source(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    exporter = platform_metrics.Exporter(settings, sources=["lake", "drift", "live"])
    readings = exporter.refresh_all()
    assert readings["drift"].error and not readings["lake"].error
    assert not readings["live"].error  # no predictions logged yet: nothing to say, no error


def test_the_flink_group_is_the_flink_jobs_default() -> None:
    source = (ROOT / "flink_jobs" / "validation_job.py").read_text()
    match = re.search(r'^DEFAULT_GROUP_ID = "([^"]+)"', source, re.M)
    assert match and match[1] == platform_metrics.FLINK_GROUP_ID


def test_the_cli_checks_its_arguments() -> None:
    with pytest.raises(SystemExit):
        platform_metrics.main(["--consumer", "no-topic"])
    with pytest.raises(ValueError, match="unknown sources"):
        platform_metrics.Exporter(Settings(), sources=["kafka", "nope"])


def test_offline_auc_of_the_versions_drift_saw_comes_from_the_registry(
    tmp_path: Path, exporter_on: Start
) -> None:
    """MLflow's own stores on SQLite (no server): the version's training run logged test_auc."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    settings = Settings(home=tmp_path / "home", mlflow_tracking_uri=uri)
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    experiment = client.create_experiment("platform-metrics")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "test_auc", 0.71)
    client.create_registered_model(settings.model_name)
    version = client.create_model_version(
        settings.model_name, str(tmp_path / "model"), run.info.run_id
    )
    plant_warehouse(settings, version=str(version.version))

    exporter = platform_metrics.Exporter(
        settings, sources=["drift", "registry"], interval=0.5, model_interval=0.5
    )
    port, samples = exporter_on(exporter)
    deadline = time.monotonic() + 60
    while value(samples, "easymlops_model_offline_auc", model_version=version.version) is None:
        assert time.monotonic() < deadline, samples
        time.sleep(0.3)
        samples = scrape(port)
    assert value(samples, "easymlops_model_offline_auc", model_version=version.version) == 0.71
    assert value(samples, "easymlops_platform_scrape_error", source="registry") == 0


def test_the_command_compose_runs_serves_metrics(tmp_path: Path) -> None:
    """`python -m easymlops.platform_metrics --port N` as a process of its own, settings from
    the environment, stopped with SIGTERM as `docker stop` does."""
    import os
    import subprocess
    import sys

    settings = Settings(home=tmp_path / "home")
    rows = plant_silver(settings)
    port = free_port()
    env = {**os.environ, "EASYMLOPS_HOME": str(settings.home)}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "easymlops.platform_metrics",
            "--port",
            str(port),
            "--source",
            "lake",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.communicate()[0]
            try:
                samples = scrape(port)
            except httpx.TransportError:
                samples = {}
            if value(samples, "easymlops_platform_scrape_error", source="lake") is not None:
                break
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert value(samples, "easymlops_platform_scrape_error", source="lake") == 0
        assert value(samples, "easymlops_lake_rows", layer="silver", table="events") == rows
        assert value(samples, "easymlops_platform_scrape_error", source="kafka") is None
    finally:
        process.terminate()
        output = process.communicate(timeout=30)[0]
    assert f"platform metrics on http://127.0.0.1:{port}/metrics (sources: lake)" in output
