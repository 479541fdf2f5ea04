"""The Ray Serve app: pure feature assembly and request schema, then one real deployment on the
stack's Ray head (Serve start costs ~30 s on 2 cores, so it is deployed once per module)."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import numpy as np
import polars as pl
import pytest
import ray
import redis
import xgboost
from pydantic import ValidationError

from easymlops import registry
from easymlops.features import (
    FEATURE_SET_VERSION,
    META_KEY,
    MODEL_FEATURES,
    PRODUCT_FEATURES,
    SESSION_FEATURES,
    USER_FEATURES,
    product_key,
    session_key,
    user_key,
)
from easymlops.schema import MAX_STRING_LENGTH, Event, format_time, validate_record
from easymlops.session_features import (
    FUNNEL_RANK,
    SessionFeatureWriter,
    epoch_micros,
    event_field,
    features_at,
)
from easymlops.settings import Settings
from serving.features import (
    assemble_row,
    feature_values,
    redis_keys,
    session_features,
    to_matrix,
)
from serving.model import ServingConfig
from serving.schemas import PredictRequest
from tests.conftest import free_port

# ---- pure parts ----------------------------------------------------------------------------

USER = {name: str(i + 1.5) for i, name in enumerate(USER_FEATURES)}
PRODUCT = {name: str(10.0 * (i + 1)) for i, name in enumerate(PRODUCT_FEATURES)}
SESSION = {name: str(i) for i, name in enumerate(SESSION_FEATURES)}


def test_assemble_row_orders_all_features_like_the_model() -> None:
    row = assemble_row({"price": 9.5}, USER, PRODUCT, SESSION)
    assert row.missing == ()
    expected = {"price": 9.5} | {k: float(v) for k, v in (USER | PRODUCT | SESSION).items()}
    assert row.values == tuple(expected[name] for name in MODEL_FEATURES)


def test_assemble_row_marks_absent_hashes_missing_as_nan() -> None:
    row = assemble_row({"price": 1.0}, {}, PRODUCT, SESSION)
    assert row.missing == USER_FEATURES
    values = dict(zip(MODEL_FEATURES, row.values, strict=True))
    assert all(math.isnan(values[name]) for name in USER_FEATURES)
    assert values["product_views"] == 10.0


def test_assemble_row_treats_bad_values_as_missing() -> None:
    user = USER | {"user_views": "not-a-number", "user_carts": "nan", "user_sessions": "inf"}
    row = assemble_row({"price": None}, user, PRODUCT, SESSION)
    assert set(row.missing) == {"price", "user_views", "user_carts", "user_sessions"}


def test_assemble_row_reads_each_family_only_from_its_source() -> None:
    # A stray `price` in a Redis hash must not override the request, nor unknown fields matter.
    user = USER | {"price": "999", "extra_column": "1"}
    row = assemble_row({"price": 2.0}, user, PRODUCT, SESSION)
    assert row.values[MODEL_FEATURES.index("price")] == 2.0
    assert row.missing == ()


def test_assemble_row_accepts_undecoded_redis_bytes() -> None:
    as_bytes = {k.encode(): v.encode() for k, v in USER.items()}
    assert assemble_row({"price": 1.0}, as_bytes, PRODUCT, SESSION) == assemble_row(
        {"price": 1.0}, USER, PRODUCT, SESSION
    )


def test_to_matrix_and_keys() -> None:
    rows = [
        assemble_row({"price": 1.0}, USER, {}, SESSION),
        assemble_row({"price": 2.0}, {}, {}, {}),
    ]
    matrix = to_matrix(rows)
    assert matrix.shape == (2, len(MODEL_FEATURES))
    assert matrix.dtype == np.float32
    assert np.isnan(matrix[1, 1:]).all()
    assert to_matrix([]).shape == (0, len(MODEL_FEATURES))
    assert redis_keys(7, 8, "abc") == (user_key(7), product_key(8), session_key("abc"))


def test_request_schema() -> None:
    ok = PredictRequest.model_validate(
        {
            "user_id": "12",
            "product_id": 3,
            "user_session": "s",
            "price": 0,
            "event_time": "2019-10-01 00:00:00 UTC",
            "event_type": "cart",  # extra fields are ignored: a whole event can be posted
        }
    )
    assert ok.user_id == 12
    assert ok.event_time is not None and ok.event_time.tzinfo is not None
    assert ok.event_id is None
    with_id = PredictRequest.model_validate(
        {"user_id": 1, "product_id": 1, "user_session": "s", "price": 1.0, "event_id": "c #1"}
    )
    assert with_id.event_id == "c #1"
    for bad in (
        {"user_id": True},
        {"price": -1},
        {"price": "nan"},
        {"event_time": "yesterday"},
        {"event_id": ""},
        {"event_id": "x" * (MAX_STRING_LENGTH + 1)},
    ):
        with pytest.raises(ValidationError):
            PredictRequest.model_validate(
                {"user_id": 1, "product_id": 1, "user_session": "s", "price": 1.0} | bad
            )


def test_replica_config_ignores_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EASYMLOPS_MODEL_NAME", "from_env")
    monkeypatch.setenv("EASYMLOPS_MLFLOW_TRACKING_URI", "http://elsewhere:1")
    monkeypatch.setenv("EASYMLOPS_SERVE_DEBUG_FEATURES", "true")
    config = ServingConfig("http://mlflow:5000", "redis://r:6379/0", "m", "champion")
    settings = config.settings()
    assert (settings.mlflow_uri, settings.redis, settings.model_name) == (
        "http://mlflow:5000",
        "redis://r:6379/0",
        "m",
    )
    assert settings.serve_debug_features is False
    # The flag travels in the init args, from the deploying process's settings.
    debug = ServingConfig.from_settings(Settings(serve_debug_features=True))
    assert debug.debug_features and debug.settings().serve_debug_features


def test_fingerprint_covers_every_module_a_replica_imports() -> None:
    from serving.deploy import REPLICA_MODULES

    script = (
        "import sys, serving.app; print(' '.join(sorted(m for m in sys.modules "
        "if m.startswith(('easymlops.', 'serving.')))))"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert set(done.stdout.split()) == set(REPLICA_MODULES)


# ---- the deployed app -----------------------------------------------------------------------

MODEL_NAME = "test_serving_model"
POLL_S = 2.0
USER_ID, PRODUCT_ID, SESSION_ID = 4242, 777, "sess-test-serving"
PRICE = 12.5
# The scored cart: at CART_TIME, after the session's first events (SESSION_EVENTS).
CART_TIME = datetime(2026, 1, 1, 12, 10, tzinfo=UTC)
CART_ID = "sess-test-serving-cart"
BODY = {
    "user_id": USER_ID,
    "product_id": PRODUCT_ID,
    "user_session": SESSION_ID,
    "price": PRICE,
    "event_time": format_time(CART_TIME),
    "event_id": CART_ID,
}


def session_event(
    event_id: str, seconds: float, event_type: str, product_id: int = PRODUCT_ID
) -> Event:
    """An event of the test session, `seconds` after the cart's moment."""
    return validate_record(
        {
            "event_id": event_id,
            "event_time": format_time(CART_TIME + timedelta(seconds=seconds)),
            "event_type": event_type,
            "product_id": product_id,
            "category_id": 1,
            "price": PRICE,
            "user_id": USER_ID,
            "user_session": SESSION_ID,
        },
        now=CART_TIME + timedelta(days=1),
    )


SESSION_EVENTS = [
    session_event("s1", -600, "view"),
    session_event("s2", -300, "view", product_id=1),
    session_event("s3", -120, "view"),
    session_event("s4", -60, "cart", product_id=1),
    session_event(CART_ID, 0, "cart"),  # the stream has seen the scored cart too
]
# What the cart sees: the four events before it.
CART_SESSION = features_at(dict(map(event_field, SESSION_EVENTS)), PRODUCT_ID, CART_TIME, CART_ID)


def tiny_booster(seed: int) -> xgboost.Booster:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(300, len(MODEL_FEATURES)))
    y = (x[:, 0] + rng.normal(scale=0.5, size=300) > 0).astype(int)
    data = xgboost.DMatrix(x, label=y, feature_names=list(MODEL_FEATURES))
    return xgboost.train({"objective": "binary:logistic", "max_depth": 2}, data, 4)


@dataclass
class Served:
    settings: Settings
    url: str
    http: httpx.Client
    deploy_seconds: float

    def champion_version(self) -> str:
        champion = registry.champion(self.settings)
        assert champion is not None
        return champion.version


services = pytest.mark.services


@pytest.fixture(scope="module")
def served(stack: Settings) -> Iterator[Served]:
    """The app deployed by a separate, short-lived process (as a Dagster run does), with a
    promoted model and features in Redis; the app must outlive that process."""
    # Debug features on, here and in the deploying process: responses carry their features.
    settings = stack.model_copy(update={"model_name": MODEL_NAME, "serve_debug_features": True})
    v1 = registry.log_and_register(tiny_booster(1), params={}, metrics={}, settings=settings)
    registry.promote(v1.version, settings)
    store = redis.Redis.from_url(settings.redis)
    store.hset(user_key(USER_ID), mapping=USER)
    store.hset(product_key(PRODUCT_ID), mapping=PRODUCT)
    store.delete(session_key(SESSION_ID))
    SessionFeatureWriter(store, settings.session_ttl_seconds).apply(SESSION_EVENTS)

    connected_before = ray.is_initialized()
    started = time.monotonic()
    script = (
        "import sys; from easymlops.settings import Settings; from serving.deploy import deploy; "
        f"print(deploy(Settings(), poll_interval_s={POLL_S}, timeout=240))"
    )
    env = os.environ | {"EASYMLOPS_MODEL_NAME": MODEL_NAME, "EASYMLOPS_SERVE_DEBUG_FEATURES": "1"}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300
    )
    deploy_seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr[-3000:]
    url = done.stdout.strip().splitlines()[-1]
    assert url == settings.serve_url
    print(f"deploy from a fresh process took {deploy_seconds:.1f}s")
    try:
        with httpx.Client(base_url=url, timeout=10.0) as http:
            yield Served(settings, url, http, deploy_seconds)
    finally:
        from serving.deploy import undeploy

        undeploy(settings)
        if not connected_before:
            ray.shutdown()  # leave this process as the fixture found it
        for key in (user_key(USER_ID), product_key(PRODUCT_ID), session_key(SESSION_ID)):
            store.delete(key)


@services
def test_app_outlives_the_deploying_process(served: Served) -> None:
    assert served.http.get("/healthz").json()["status"] == "alive"
    ready = served.http.get("/readyz")
    assert ready.status_code == 200, ready.text
    assert ready.json()["status"] == "ready"


@services
def test_predict(served: Served) -> None:
    response = served.http.post("/predict", json=BODY)
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0.0 <= body["probability"] <= 1.0
    assert body["model_name"] == MODEL_NAME
    assert body["model_version"] == served.champion_version()
    assert body["missing_features"] == []
    assert body["feature_set_version"] == FEATURE_SET_VERSION
    row = assemble_row({"price": PRICE}, USER, PRODUCT, CART_SESSION)
    assert body["features"] == feature_values(row)  # debug features are on in this deployment
    assert CART_SESSION == {
        "session_events": 4.0,
        "session_views": 3.0,
        "session_product_views": 2.0,
        "session_carts": 1.0,
        "session_seconds": 600.0,
        "session_distinct_products": 2.0,
    }
    # Same probability as the booster on the same row, locally: serving adds no skew.
    local = registry.load_booster(f"models:/{MODEL_NAME}/{body['model_version']}", served.settings)
    matrix = xgboost.DMatrix(to_matrix([row]), feature_names=list(MODEL_FEATURES))
    assert body["probability"] == pytest.approx(float(local.predict(matrix)[0]), abs=1e-6)


@services
def test_predict_unknown_user_lists_missing_user_features(served: Served) -> None:
    response = served.http.post("/predict", json=BODY | {"user_id": 987654321})
    assert response.status_code == 200, response.text
    assert response.json()["missing_features"] == list(USER_FEATURES)


@services
def test_predict_rejects_bad_input_naming_the_field(served: Served) -> None:
    no_user = {k: v for k, v in BODY.items() if k != "user_id"}
    response = served.http.post("/predict", json=no_user)
    assert response.status_code == 422
    errors = response.json()["detail"]
    assert [(e["field"], e["type"]) for e in errors] == [("user_id", "missing")]
    assert "user_id" in response.json()["message"]

    response = served.http.post("/predict", json=BODY | {"price": -1})
    assert response.status_code == 422
    [error] = response.json()["detail"]
    assert error["field"] == "price"
    assert "greater than or equal to 0" in error["reason"]

    response = served.http.post(
        "/predict", content=b'{"user_id": 1,', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "body"


@services
def test_predict_batch(served: Served) -> None:
    requests = [BODY, BODY | {"user_id": 987654321}, BODY | {"product_id": 1, "price": 0}]
    response = served.http.post("/predict/batch", json={"requests": requests})
    assert response.status_code == 200, response.text
    predictions = response.json()["predictions"]
    assert len(predictions) == 3
    assert [p["missing_features"] for p in predictions] == [
        [],
        list(USER_FEATURES),
        list(PRODUCT_FEATURES),
    ]
    single = served.http.post("/predict", json=BODY).json()
    assert predictions[0]["probability"] == pytest.approx(single["probability"])

    response = served.http.post(
        "/predict/batch", json={"requests": [BODY, {k: v for k, v in BODY.items() if k != "price"}]}
    )
    assert response.status_code == 422
    assert response.json()["detail"][0]["field"] == "requests[1].price"


@services
def test_model_and_metrics(served: Served) -> None:
    model = served.http.get("/model").json()
    version = served.champion_version()
    assert model["name"] == MODEL_NAME
    assert model["version"] == version
    assert model["feature_names"] == list(MODEL_FEATURES)
    assert model["run_id"] and model["loaded_at"]

    served.http.post("/predict", json=BODY)
    text = served.http.get("/metrics").text
    assert (
        'easymlops_serving_requests_total{endpoint="/predict",method="POST",status="200"}' in text
    )
    assert (
        'easymlops_serving_requests_total{endpoint="/predict",method="POST",status="422"}' in text
    )
    assert "easymlops_serving_request_latency_seconds_bucket" in text
    assert f'model_name="{MODEL_NAME}",model_version="{version}"' in text


@services
def test_latency(served: Served) -> None:
    for _ in range(10):
        served.http.post("/predict", json=BODY)
    latencies = []
    for _ in range(100):
        started = time.perf_counter()
        assert served.http.post("/predict", json=BODY).status_code == 200
        latencies.append(time.perf_counter() - started)
    p50 = sorted(latencies)[50] * 1000
    print(f"/predict p50 {p50:.1f} ms over HTTP through the Serve proxy")
    assert p50 < 200  # generous: a loaded 2-core CI box; typical is ~10 ms


@services
def test_feature_set_mismatch_refuses_predictions(served: Served) -> None:
    store = redis.Redis.from_url(served.settings.redis, decode_responses=True)
    saved = store.hgetall(META_KEY)
    store.hset(META_KEY, "feature_set_version", "v0-test")
    try:
        response = _wait_for(lambda: served.http.post("/predict", json=BODY), 503, 6 * POLL_S)
        assert "feature set v0-test" in response.json()["detail"]
        assert served.http.get("/readyz").status_code == 503
    finally:
        store.delete(META_KEY)
        if saved:
            store.hset(META_KEY, mapping=saved)
    _wait_for(lambda: served.http.post("/predict", json=BODY), 200, 6 * POLL_S)


@services
def test_hot_reload_of_a_new_champion(served: Served) -> None:
    before = served.champion_version()
    new = registry.log_and_register(
        tiny_booster(2), params={}, metrics={}, settings=served.settings
    )
    registry.promote(new.version, served.settings)
    promoted = time.monotonic()
    while served.http.get("/model").json()["version"] != new.version:
        assert time.monotonic() - promoted < 10 * POLL_S, "new champion not picked up"
        time.sleep(0.2)
    took = time.monotonic() - promoted
    print(f"version {before} -> {new.version} served {took:.1f}s after promotion")
    assert served.http.post("/predict", json=BODY).json()["model_version"] == new.version


@services
def test_a_champion_that_fails_to_load_keeps_the_old_model(served: Served) -> None:
    before = served.champion_version()
    client = registry.client(served.settings)
    # A version whose artifacts do not exist (an empty run): the replica's download fails.
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.set_terminated(run.info.run_id)
    broken = client.create_model_version(
        MODEL_NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    registry.promote(broken, served.settings)
    try:
        deadline = time.monotonic() + 10 * POLL_S
        while not (info := served.http.get("/model").json()).get("last_poll_error"):
            assert time.monotonic() < deadline, f"load failure never reported: {info}"
            time.sleep(0.2)
        assert info["version"] == before
        assert served.http.post("/predict", json=BODY).json()["model_version"] == before
        assert served.http.get("/readyz").status_code == 200
    finally:
        registry.promote(before, served.settings)
    deadline = time.monotonic() + 10 * POLL_S
    while served.http.get("/model").json().get("last_poll_error"):
        assert time.monotonic() < deadline, "poll error not cleared after the alias moved back"
        time.sleep(0.2)


@services
def test_predictions_are_logged_through_a_broker_pause(served: Served, tmp_path: Path) -> None:
    """Every prediction reaches the predictions topic, also those made while the broker was
    stopped (SIGSTOP), requests are not slowed meanwhile, and bronze_predictions lands each
    exactly once."""
    import json
    import signal

    from easymlops import stack
    from easymlops.kafka import consumer

    broker = next(s for s in stack.status(served.settings) if s.name == "kafka")
    assert broker.pid is not None
    before = [served.http.post("/predict", json=BODY).json() for _ in range(5)]
    os.killpg(broker.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        during = [served.http.post("/predict", json=BODY) for _ in range(50)]
        paused_for = time.monotonic() - started
    finally:
        os.killpg(broker.pid, signal.SIGCONT)
    assert [r.status_code for r in during] == [200] * 50
    assert paused_for < 15, f"50 requests took {paused_for:.1f}s with the broker stopped"
    sent = {body["request_id"]: body for body in before + [r.json() for r in during]}
    assert len(sent) == 55  # one id per prediction

    logged: dict[str, dict] = {}
    reader = consumer(
        served.settings, f"test-predictions-{uuid.uuid4().hex}", **{"auto.offset.reset": "earliest"}
    )
    reader.subscribe([served.settings.topic_predictions])
    deadline = time.monotonic() + 120
    try:
        while not sent.keys() <= logged.keys() and time.monotonic() < deadline:
            message = reader.poll(1.0)
            if message is not None and message.error() is None:
                record = json.loads(message.value() or b"{}")
                logged[record["request_id"]] = record
    finally:
        reader.close()
    missing = sent.keys() - logged.keys()
    assert not missing, f"{len(missing)} of {len(sent)} predictions never reached the topic"
    for request_id, body in sent.items():
        record = logged[request_id]
        assert record["probability"] == body["probability"]
        assert record["model_version"] == body["model_version"]
        assert record["features"]["price"] == BODY["price"]
        assert record["user_id"] == BODY["user_id"]
    metrics = served.http.get("/metrics").text
    assert 'easymlops_serving_predictions_log_total{outcome="delivered"}' in metrics

    from easymlops import lake

    table = str(tmp_path / "bronze" / "predictions")
    topic = served.settings.topic_predictions
    first = lake.land_topic(served.settings, topic, table, "predictions")
    assert lake.land_topic(served.settings, topic, table, "predictions").rows == 0
    landed = lake.read_bronze(table).filter(pl.col("request_id").is_in(list(sent)))
    assert first.rows >= len(sent) and landed.height == len(sent)
    row = landed.row(0, named=True)
    assert json.loads(row["features"])["price"] == BODY["price"]
    assert row["probability"] == sent[row["request_id"]]["probability"]
    assert row["predicted_at"] is not None and row["scored_at"] is not None
    assert "easymlops_serving_predictions_log_dropped_total 0.0" in metrics


def test_a_full_prediction_queue_drops_and_counts_without_blocking() -> None:
    from serving.metrics import serving_metrics
    from serving.prediction_log import PredictionLog

    dropped = serving_metrics().predictions_log_dropped
    start = dropped._value.get()
    # Nothing listens on this port: every record stays queued, the queue holds 5.
    log = PredictionLog(f"127.0.0.1:{free_port()}", "predictions", max_queued=5)
    started = time.monotonic()
    accepted = [log.send(f"r{i}", {"i": i}) for i in range(12)]
    took = time.monotonic() - started
    assert accepted == [True] * 5 + [False] * 7
    assert dropped._value.get() - start == 7
    assert took < 1.0
    log.close(timeout=0.1)


@services
def test_redeploy_of_the_same_app_is_a_no_op(served: Served) -> None:
    from serving.deploy import deploy

    fingerprint = served.http.get("/healthz").json()["deployment"]
    settings = served.settings
    started = time.monotonic()
    assert deploy(settings, poll_interval_s=POLL_S, timeout=120) == served.url
    assert time.monotonic() - started < 30  # ray.init only; a redeploy restarts the replica
    assert served.http.get("/healthz").json()["deployment"] == fingerprint


@services
def test_503_until_a_model_exists(served: Served) -> None:
    """A second small app on the same Serve instance, for a model with no versions at all."""
    from serving.deploy import deploy, undeploy

    settings = served.settings.model_copy(update={"model_name": "test_serving_never_registered"})
    url = deploy(
        settings, app_name="purchase-empty", route_prefix="/empty", wait_ready=False, num_cpus=0.1
    )
    assert url == f"{settings.serve_url}/empty"
    try:
        with httpx.Client(base_url=url, timeout=10.0) as http:
            _wait_for(lambda: http.get("/healthz"), 200, 180)
            response = http.post("/predict", json=BODY)
            assert response.status_code == 503
            assert "no model loaded" in response.json()["detail"]
            ready = http.get("/readyz")
            assert ready.status_code == 503
            assert ready.json()["checks"]["redis"] == "ok"
            assert "test_serving_never_registered" in ready.json()["checks"]["model"]
            assert http.get("/model").status_code == 503
            # Bad input is still a 422, not a 503: validation does not need a model.
            assert http.post("/predict", json={}).status_code == 422
    finally:
        undeploy(settings, app_name="purchase-empty")
    # The main app is untouched by the other app's life cycle.
    assert served.http.get("/readyz").status_code == 200


def _metric(text: str, name: str) -> float:
    """The value of an unlabelled Prometheus sample in /metrics text."""
    line = next(line for line in text.splitlines() if line.startswith(name + " "))
    return float(line.split()[1])


@services
def test_serve_batch_scores_each_request_as_alone(served: Served) -> None:
    """A second app with @serve.batch (EASYMLOPS_SERVE_BATCH_MAX_SIZE): 24 concurrent requests
    of different prices and users are scored in fewer model calls than requests, and each
    answer is the one the unbatched app gives to that request alone (no mix-up in a batch)."""
    import asyncio

    from serving.deploy import deploy, undeploy

    settings = served.settings.model_copy(
        update={"serve_batch_max_size": 8, "serve_batch_wait_ms": 50.0}
    )
    bodies = [
        BODY | {"price": i / 8, "user_id": USER_ID if i % 3 else 987654321} for i in range(24)
    ]
    alone = [served.http.post("/predict", json=body).json() for body in bodies]
    assert len({a["probability"] for a in alone}) > 1  # the bodies do score differently
    url = deploy(settings, app_name="purchase-batched", route_prefix="/batched", num_cpus=0.1)
    try:

        async def concurrently() -> list[httpx.Response]:
            async with httpx.AsyncClient(base_url=url, timeout=30.0) as http:
                return await asyncio.gather(*(http.post("/predict", json=b) for b in bodies))

        batched = [r.json() for r in asyncio.run(concurrently())]
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    finally:
        undeploy(settings, app_name="purchase-batched")
    for one, other in zip(alone, batched, strict=True):
        assert other["probability"] == pytest.approx(one["probability"], abs=1e-7)
        assert other["missing_features"] == one["missing_features"]
    rows = _metric(metrics, "easymlops_serving_model_call_rows_sum")
    calls = _metric(metrics, "easymlops_serving_model_call_rows_count")
    assert rows == len(bodies)
    assert calls < rows, f"{calls:.0f} model calls for {rows:.0f} rows: nothing was batched"


@services
def test_canary_sends_its_share_to_the_challenger(served: Served) -> None:
    """A second app with EASYMLOPS_CANARY_PERCENT=30: over 300 requests the challenger answers
    about 30% (binomial sd 2.6%: within 30 +- 10%), each response naming its version; the main
    app (canary off) never answers with the challenger."""
    from serving.deploy import deploy, undeploy

    champion = served.champion_version()
    challenger = registry.log_and_register(
        tiny_booster(7), params={}, metrics={}, settings=served.settings
    ).version
    registry.promote(challenger, served.settings, alias="challenger")
    settings = served.settings.model_copy(update={"canary_percent": 30.0})
    url = deploy(
        settings,
        app_name="purchase-canary",
        route_prefix="/canary",
        poll_interval_s=POLL_S,
        num_cpus=0.1,
        wait_ready=True,
    )
    try:
        with httpx.Client(base_url=url, timeout=10.0) as http:
            # The challenger watcher loads in the background: wait until it answers once.
            deadline = time.monotonic() + 10 * POLL_S
            while http.post("/predict", json=BODY).json()["model_version"] != challenger:
                assert time.monotonic() < deadline, "the challenger never answered"
            versions = [
                http.post("/predict", json=BODY).json()["model_version"] for _ in range(300)
            ]
    finally:
        undeploy(settings, app_name="purchase-canary")
    assert set(versions) == {champion, challenger}
    share = versions.count(challenger) / len(versions)
    assert 0.20 <= share <= 0.40, share
    main = {served.http.post("/predict", json=BODY).json()["model_version"] for _ in range(30)}
    assert main == {champion}


def _wait_for(call: Callable[[], httpx.Response], status: int, timeout: float) -> httpx.Response:
    deadline = time.monotonic() + timeout
    while True:
        try:
            response = call()
            if response.status_code == status:
                return response
            last = f"{response.status_code} {response.text[:300]}"
        except httpx.HTTPError as exc:
            last = repr(exc)
        if time.monotonic() > deadline:
            raise AssertionError(f"expected {status} within {timeout}s, last: {last}")
        time.sleep(0.25)


@services
def test_events_after_the_cart_do_not_change_its_features(served: Served) -> None:
    """The stream goes on after the cart (its purchase, more views): the cart's features, and so
    its probability, stay what they were at its event_time."""
    before = served.http.post("/predict", json=BODY).json()
    store = redis.Redis.from_url(served.settings.redis)
    later = [
        session_event("later-buy", 0, "purchase"),  # the purchase at the cart's very instant
        session_event("later-remove", 0, "remove_from_cart"),
        session_event("later-view", 0.000001, "view"),
        session_event("later-cart", 30, "cart"),
        session_event("later-buy-2", 45, "purchase"),
    ]
    writer = SessionFeatureWriter(store, served.settings.session_ttl_seconds)
    assert writer.apply(later) == len(later)
    try:
        after = served.http.post("/predict", json=BODY).json()
        assert after["features"] == before["features"]
        assert after["probability"] == before["probability"]
        assert {k: after["features"][k] for k in CART_SESSION} == CART_SESSION
        # Scored as of a moment after those events, they count (the filter is the moment).
        moment = format_time(CART_TIME + timedelta(minutes=1))
        later_body = BODY | {"event_time": moment, "event_id": "another-cart"}
        features = served.http.post("/predict", json=later_body).json()["features"]
        assert features["session_events"] == len(SESSION_EVENTS) + len(later)
        assert features["session_seconds"] == 660.0
        # Batch items are scored alike, each at its own moment.
        batch = served.http.post("/predict/batch", json={"requests": [BODY, later_body]}).json()[
            "predictions"
        ]
        assert [p["features"] for p in batch] == [before["features"], features]
    finally:
        store.hdel(session_key(SESSION_ID), *(event_field(e)[0] for e in later))


@services
def test_without_event_time_the_moment_is_the_arrival(served: Served) -> None:
    """A request with no event_time is scored at its arrival: a session whose events happened
    just now is seconds old (not measured from some other clock), and events stamped after the
    arrival do not count."""
    session = f"sess-now-{uuid.uuid4().hex[:8]}"
    now = datetime.now(UTC)

    def event(event_id: str, seconds: float, event_type: str) -> Event:
        return replace(
            session_event(event_id, 0, event_type),
            user_session=session,
            event_time=now + timedelta(seconds=seconds),
        )

    store = redis.Redis.from_url(served.settings.redis)
    events = [event("now-1", -3, "view"), event("now-2", -2, "view"), event("soon", 600, "cart")]
    SessionFeatureWriter(store, 60).apply(events)
    body = {k: v for k, v in BODY.items() if k not in ("event_time", "event_id")}
    try:
        sent = datetime.now(UTC)
        response = served.http.post("/predict", json=body | {"user_session": session})
        received = datetime.now(UTC)
        assert response.status_code == 200, response.text
        features = response.json()["features"]
        assert features["session_events"] == 2.0  # the future-stamped cart is not counted
        # From the first event to the arrival: between its age when sent and when answered.
        assert (sent - now).total_seconds() + 3 <= features["session_seconds"]
        assert features["session_seconds"] <= (received - now).total_seconds() + 3
        assert features["session_seconds"] < 60
    finally:
        store.delete(session_key(session))


def test_features_at_follows_the_offline_order() -> None:
    """The pure function serving uses, on a hand-made session: each rule of the order
    (event_time, funnel rank, event_id) of fct_cart_events, one at a time."""
    t = datetime(2026, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)
    micros = epoch_micros(t)

    def field(eid: str, delta_us: int, event_type: str, product: int) -> tuple[str, str]:
        return f"e:{eid}", f"{micros + delta_us}|{FUNNEL_RANK[event_type]}|{product}"

    stored = dict(
        [
            field("a", -90_000_000, "view", 7),  # the session's first event, 90 s before
            field("b", -30_000_000, "view", 8),
            field("c", -10_000_000, "cart", 8),
            field("x", -5_000_000, "cart", 7),
            field("d", 0, "view", 7),  # same instant, lower rank: before the cart
            field("m", 0, "cart", 9),  # same instant, same rank: before iff its id is lower
            field("n", 0, "remove_from_cart", 7),  # same instant, higher rank: after
            field("p", 0, "purchase", 7),  # the purchase at the cart's instant: after
            field("q", 1, "view", 7),  # one microsecond later: after
        ]
    )
    # Not events (the former aggregates, a broken value): ignored, never a failure.
    stored |= {"session_events": "999", "pv:7": "5", "e:bad": "not|a|number", "e:short": "1"}

    def at(event_id: str | None) -> dict[str, float]:
        return features_at(stored, 7, t, event_id)

    assert at("z") == {  # a, b, c, x, d and m ("m" < "z")
        "session_events": 6.0,
        "session_views": 3.0,
        "session_product_views": 2.0,
        "session_carts": 3.0,
        "session_seconds": 90.0,
        "session_distinct_products": 2.0,
    }
    assert at("l")["session_carts"] == 2.0  # c and x: "m" > "l"
    assert at(None)["session_carts"] == 2.0  # c and x: unknown id, m's order is unknown
    # The cart's own id never counts, wherever its stored copy lies: x is the cart itself.
    assert at("x")["session_events"] == 5.0  # a, b, c, d, m
    assert at("x")["session_carts"] == 2.0
    assert at("a")["session_seconds"] == 30.0  # without a, the session starts at b
    # No event before the moment: zeros, and 0 seconds (the cart opens the session).
    assert features_at({}, 7, t) == {name: 0.0 for name in SESSION_FEATURES}
    assert features_at(stored, 7, t - timedelta(hours=1)) == {
        name: 0.0 for name in SESSION_FEATURES
    }
    # Microsecond exact, also far from the epoch, and a naive moment is UTC.
    late = datetime(9999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    one = {"e:far": f"{epoch_micros(late) - 1}|0|1"}
    assert features_at(one, 1, late)["session_seconds"] == 1e-6
    assert features_at(one, 1, late.replace(tzinfo=None)) == features_at(one, 1, late)


def test_session_features_decode_redis_bytes() -> None:
    stored = dict(map(event_field, SESSION_EVENTS))
    as_bytes = {k.encode(): v.encode() for k, v in stored.items()}
    features = session_features(as_bytes, PRODUCT_ID, CART_TIME, CART_ID)
    assert features == CART_SESSION == features_at(stored, PRODUCT_ID, CART_TIME, CART_ID)
    assert session_features(as_bytes, 9, CART_TIME, CART_ID)["session_product_views"] == 0.0
    row = assemble_row({"price": 1.0}, USER, PRODUCT, features)
    assert row.missing == ()
    values = feature_values(assemble_row({"price": 1.0}, {}, PRODUCT, features))
    assert list(values) == list(MODEL_FEATURES)
    assert all(values[name] is None for name in USER_FEATURES)
    assert values["session_seconds"] == 600.0
