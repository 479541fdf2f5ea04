"""Serving under faults and at its edge, on the real stack: the API key and the body limit,
traces, an online store that goes away and comes back, MLflow down at start and later, a
version that cannot be served, a replica process killed or hung. The app is the one test_serving.py
deploys (its `served` fixture); apps with other settings are deployed beside it under their own
route prefix."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import mlflow
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

import tests.test_serving as serving_tests
from benchmarks.serving import predict_scope
from easymlops import registry, stack
from easymlops.settings import Settings
from serving.app import Predictor, build_app
from serving.deploy import replica_pids
from serving.metrics import serving_metrics
from serving.model import ServingConfig
from serving.tracing import tracer_provider
from tests.conftest import free_port
from tests.test_serving import BODY, MODEL_NAME, POLL_S, Served, _wait_for

pytestmark = pytest.mark.services
# test_serving.py's module fixture, registered here under this name (deployed once per module).
deployed = serving_tests.served

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_SPAN}-01"


@pytest.fixture(scope="module")
def served(deployed: Served) -> Served:
    """test_serving.py's app, deployed once for this module too."""
    return deployed


def _side_app(served: Served, name: str, **updates: object) -> tuple[Settings, str]:
    """Deploy a second, small app with other settings at /<name> on the same Serve."""
    from serving.deploy import deploy

    settings = served.settings.model_copy(update=updates)
    url = deploy(
        settings,
        app_name=f"purchase-{name}",
        route_prefix=f"/{name}",
        wait_ready=False,
        num_cpus=0.1,
        poll_interval_s=POLL_S,
    )
    _wait_for(lambda: httpx.get(f"{url}/healthz", timeout=5), 200, 180)
    # Until HAProxy's config lists the new replica (a reload after the deployment), requests
    # reach the app through Serve's fallback proxy actor, a path with other timeouts.
    _wait_until(lambda: _replica_up_in_haproxy(served.settings, f"purchase-{name}"), 60)
    return settings, url


def _replica_up_in_haproxy(settings: Settings, app_name: str) -> bool:
    from easymlops.services.ray import haproxy_replica_stats

    rows = haproxy_replica_stats(settings)
    return any(row["pxname"] == f"http-{app_name}" and row["status"] == "UP" for row in rows)


def _wait_until(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout} s: {condition}")
        time.sleep(0.25)


def _remove_side_app(served: Served, name: str) -> None:
    from serving.deploy import undeploy

    undeploy(served.settings, app_name=f"purchase-{name}")


# ---- the edge: API key, body limit ----------------------------------------------------------
@pytest.fixture(scope="module")
def secured(served: Served) -> Iterator[tuple[str, str]]:
    """An app with an API key and a 4 KiB body limit: (its URL, the key)."""
    key = "test-key-" + os.urandom(8).hex()
    _settings, url = _side_app(
        served, "secured", serve_api_key=SecretStr(key), serve_max_body_bytes=4096
    )
    try:
        yield url, key
    finally:
        _remove_side_app(served, "secured")


def test_api_key_is_required_on_every_endpoint_but_healthz(secured: tuple[str, str]) -> None:
    url, key = secured
    good = {"Authorization": f"Bearer {key}"}
    assert httpx.get(f"{url}/healthz", timeout=10).status_code == 200
    for method, path in (
        ("POST", "/predict"),
        ("POST", "/predict/batch"),
        ("GET", "/readyz"),
        ("GET", "/model"),
        ("GET", "/metrics"),
        ("GET", "/openapi.json"),
    ):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": key}):
            refused = httpx.request(method, f"{url}{path}", json=BODY, headers=headers, timeout=10)
            assert refused.status_code == 401, (method, path, headers, refused.text)
            assert refused.headers["www-authenticate"] == "Bearer"
            assert "API key" in refused.json()["detail"]
            assert key not in refused.text
    answered = httpx.post(f"{url}/predict", json=BODY, headers=good, timeout=10)
    assert answered.status_code == 200, answered.text
    assert 0.0 <= answered.json()["probability"] <= 1.0
    assert httpx.get(f"{url}/readyz", headers=good, timeout=10).status_code == 200


def test_a_body_over_the_limit_gets_413_declared_or_chunked(secured: tuple[str, str]) -> None:
    url, key = secured
    good = {"Authorization": f"Bearer {key}"}
    small = {"requests": [BODY] * 10}  # ~2 KB: under the 4 KiB limit
    assert httpx.post(f"{url}/predict/batch", json=small, headers=good, timeout=10).is_success
    big = {"requests": [BODY] * 40}  # ~8 KB
    declared = httpx.post(f"{url}/predict/batch", json=big, headers=good, timeout=10)
    assert declared.status_code == 413, declared.text
    assert "4096 bytes" in declared.json()["detail"]
    assert "user_session" not in declared.text  # no echo of the input

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit must count the bytes
        payload = httpx.Request("POST", url, json=big).content
        for i in range(0, len(payload), 1000):
            yield payload[i : i + 1000]

    chunked = httpx.post(
        f"{url}/predict/batch",
        content=chunks(),
        headers={**good, "Content-Type": "application/json"},
        timeout=10,
    )
    assert chunked.status_code == 413, chunked.text


# ---- traces --------------------------------------------------------------------------------
def test_serve_continues_the_callers_trace_and_names_it(served: Served) -> None:
    continued = served.http.post("/predict", json=BODY, headers={"traceparent": TRACEPARENT})
    assert continued.status_code == 200, continued.text
    assert continued.headers["x-trace-id"] == TRACE_ID
    version, trace_id, span_id, _flags = continued.headers["traceparent"].split("-")
    assert (version, trace_id) == ("00", TRACE_ID)
    assert span_id != PARENT_SPAN  # the server's own span, a child of the caller's
    fresh = [served.http.post("/predict", json=BODY).headers["x-trace-id"] for _ in range(2)]
    assert len(set(fresh)) == 2 and TRACE_ID not in fresh
    assert all(len(t) == 32 and int(t, 16) for t in fresh)


@pytest.fixture
def in_process(served: Served) -> Iterator[tuple[Predictor, InMemorySpanExporter]]:
    """The app's own Predictor in this process, its spans kept in memory."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = ServingConfig.from_settings(served.settings)
    predictor = Predictor(config, "in-process", tracer_provider=provider)
    try:
        yield predictor, exporter
    finally:
        predictor.close()


def test_a_replica_freezes_its_startup_objects_out_of_the_cyclic_gc(served: Served) -> None:
    """A full collection walked the replica's ~300k startup objects, a 227 ms stop under load
    (the soak's p99). Built, the Predictor has frozen them, the loaded model among them, so
    collections no longer see them; objects of later requests are still collected."""
    try:
        predictor = Predictor(ServingConfig.from_settings(served.settings), "gc")
        try:
            model = predictor.current_model()
            assert model is not None
            tracked = {id(obj) for obj in gc.get_objects()}
            assert id(model) not in tracked and id(predictor) not in tracked
            assert gc.get_freeze_count() > 10_000
            later = [predictor]  # a request's objects, made after startup
            assert any(obj is later for obj in gc.get_objects())
        finally:
            predictor.close()
    finally:
        gc.unfreeze()  # this is the test process, not a replica


def test_garbage_collections_are_timed_in_the_metrics(served: Served) -> None:
    """What the replica reports as a full collection's pause is that collection's time, and the
    running replica exports the series."""
    metrics = serving_metrics()

    def full_collections() -> tuple[float, float]:
        labels = {"generation": "2"}
        count = metrics.registry.get_sample_value(
            "easymlops_serving_gc_pause_seconds_count", labels
        )
        total = metrics.registry.get_sample_value("easymlops_serving_gc_pause_seconds_sum", labels)
        return count or 0.0, total or 0.0

    heap = [[i] for i in range(2_000_000)]  # tracked containers: a full collection walks each
    count_before, sum_before = full_collections()
    started = time.perf_counter()
    gc.collect(2)
    wall = time.perf_counter() - started
    count_after, sum_after = full_collections()
    del heap
    assert count_after == count_before + 1
    paused = sum_after - sum_before
    assert wall > 0.02, f"the heap was too small to time: {wall * 1000:.1f} ms"
    assert 0.5 * wall <= paused <= wall, (paused, wall)

    served.http.post("/predict", json=BODY)
    exported = {
        sample.labels["generation"]: sample.value
        for family in text_string_to_metric_families(served.http.get("/metrics").text)
        if family.name == "easymlops_serving_gc_pause_seconds"
        for sample in family.samples
        if sample.name.endswith("_count")
    }
    assert set(exported) == {"0", "1", "2"}
    assert exported["0"] > 0  # a replica that has served requests has collected young objects


def _post(predictor: Predictor, path: str, body: object, **headers: str) -> httpx.Response:
    """One request to the app in this process (ASGI, no server)."""

    async def post() -> httpx.Response:
        transport = httpx.ASGITransport(app=build_app(predictor))
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            return await client.post(path, json=body, headers=headers)

    return asyncio.run(post())


def test_spans_of_a_request(in_process: tuple[Predictor, InMemorySpanExporter]) -> None:
    predictor, exporter = in_process
    response = _post(predictor, "/predict", BODY, traceparent=TRACEPARENT)
    assert response.status_code == 200, response.text
    spans = {span.name: span for span in exporter.get_finished_spans()}
    assert set(spans) == {"POST /predict", "feature_fetch", "model", "response"}
    server = spans["POST /predict"]
    assert server.kind == SpanKind.SERVER
    assert f"{server.context.trace_id:032x}" == TRACE_ID
    assert server.parent is not None and f"{server.parent.span_id:016x}" == PARENT_SPAN
    for name in ("feature_fetch", "model", "response"):
        assert spans[name].parent is not None
        assert spans[name].parent.span_id == server.context.span_id, name
        assert spans[name].context.trace_id == server.context.trace_id
    body = response.json()
    assert server.attributes is not None
    assert server.attributes["easymlops.model_version"] == body["model_version"]
    assert tuple(server.attributes["easymlops.request_ids"]) == (body["request_id"],)  # type: ignore[arg-type]
    assert server.attributes["http.response.status_code"] == 200
    # The fetch span starts after and ends before the server span: a real child, timed.
    fetch = spans["feature_fetch"]
    assert server.start_time is not None and server.end_time is not None
    assert fetch.start_time is not None and fetch.end_time is not None
    assert server.start_time <= fetch.start_time <= fetch.end_time <= server.end_time


def test_a_refused_request_is_traced_too(
    in_process: tuple[Predictor, InMemorySpanExporter],
) -> None:
    predictor, exporter = in_process
    response = _post(predictor, "/predict", {"user_id": "x"}, traceparent=TRACEPARENT)
    assert response.status_code == 422
    assert response.headers["x-trace-id"] == TRACE_ID
    (server,) = exporter.get_finished_spans()
    assert server.attributes is not None
    assert server.attributes["http.response.status_code"] == 422


def _asgi_predict(
    app: object,
    receive: Callable[[], Awaitable[dict[str, object]]],
    cancel_after: float | None = None,
) -> list[dict]:
    """Drive one POST /predict through the ASGI app with a hand-made `receive`, as a server
    would, cancelling it after `cancel_after` seconds if given; returns what the app sent (to
    a client that may be gone)."""
    body = json.dumps(BODY).encode()
    scope = predict_scope(body, [(b"content-type", b"application/json")])
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def run() -> None:
        task = asyncio.ensure_future(app(scope, receive, send))  # type: ignore[operator]
        if cancel_after is not None:
            await asyncio.sleep(cancel_after)
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(run())
    return sent


def _predict_counts() -> dict[str, float]:
    """easymlops_serving_requests_total of POST /predict in this process, by status."""
    counts: dict[str, float] = {}
    for family in serving_metrics().registry.collect():
        for sample in family.samples:
            labels = sample.labels
            if sample.name.endswith("_total") and labels.get("endpoint") == "/predict":
                counts[labels["status"]] = sample.value
    return counts


def test_a_client_gone_before_its_answer_is_counted_499_not_as_an_error(
    in_process: tuple[Predictor, InMemorySpanExporter],
) -> None:
    """A client that disconnects (its timeout passed while the request queued) is not the
    server's error: counted as 499, as NGINX and Serve's own proxy count it, so the 5xx alert
    (infra/prometheus/alerts.yml) does not fire on clients' timeouts."""
    predictor, _exporter = in_process
    app = build_app(predictor)
    before = _predict_counts()

    async def gone() -> dict[str, object]:  # the client left before its body arrived
        return {"type": "http.disconnect"}

    _asgi_predict(app, gone)

    async def waiting() -> dict[str, object]:
        await asyncio.sleep(30)  # the body never comes
        return {"type": "http.disconnect"}

    # Serve's direct ingress cancels the handler's task when it sees the client go.
    _asgi_predict(app, waiting, cancel_after=0.2)
    after = _predict_counts()
    grew = {s: after.get(s, 0.0) - before.get(s, 0.0) for s in after}
    assert grew.get("499") == 2, grew
    assert not any(n for s, n in grew.items() if s != "499"), grew


class _OtlpReceiver(BaseHTTPRequestHandler):
    """Decodes the OTLP/HTTP protobuf body a collector would receive at /v1/traces."""

    received: list[tuple[str, ExportTraceServiceRequest]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        self.received.append((self.path, request))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def test_spans_are_exported_over_otlp_when_an_endpoint_is_set(served: Served) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", free_port()), _OtlpReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    config = ServingConfig.from_settings(served.settings)
    predictor = Predictor(config, "otlp", tracer_provider=tracer_provider(endpoint))
    try:
        response = _post(predictor, "/predict", BODY, traceparent=TRACEPARENT)
        assert response.status_code == 200
    finally:
        predictor.close()  # flushes the batch processor
        server.shutdown()
    names = {
        span.name
        for path, request in _OtlpReceiver.received
        if path == "/v1/traces"
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
        if span.trace_id.hex() == TRACE_ID
    }
    assert names == {"POST /predict", "feature_fetch", "model", "response"}


# ---- outages ---------------------------------------------------------------------------------
def test_redis_stopped_gives_503_then_recovers_without_restart(served: Served) -> None:
    """Redis goes away mid-load: every request answers (503 naming the online store) within the
    client timeout, none hangs; Redis back: 200 again, from the same replica."""
    fingerprint = served.http.get("/healthz").json()["deployment"]
    assert served.http.post("/predict", json=BODY).status_code == 200
    outcomes: list[tuple[int, float, str]] = []
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=served.url, timeout=10.0) as http:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    response = http.post("/predict", json=BODY)
                    outcomes.append(
                        (response.status_code, time.monotonic() - started, response.text)
                    )
                except httpx.HTTPError as exc:
                    outcomes.append((0, time.monotonic() - started, repr(exc)))
                time.sleep(0.02)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        time.sleep(1)
        assert stack.down(served.settings, services=["redis"]) == ["redis"]
        time.sleep(3)
        down_outcomes = len(outcomes)
    finally:
        stack.up(served.settings, services=["redis"])
    recovered = _wait_for(lambda: served.http.post("/predict", json=BODY), 200, 30)
    stop.set()
    loader.join(30)
    assert recovered.json()["model_version"]
    during = outcomes[:down_outcomes]
    refused = [o for o in during if o[0] == 503]
    assert refused, f"no 503 while Redis was down: {[o[:2] for o in during]}"
    assert all("online store unavailable" in text for _s, _t, text in refused)
    assert {status for status, _t, _x in outcomes} <= {200, 503}, outcomes
    slowest = max(seconds for _s, seconds, _x in outcomes)
    assert slowest < 2.0 + 3.0, f"a request took {slowest:.1f}s (Redis timeout is 2 s)"
    assert served.http.get("/healthz").json()["deployment"] == fingerprint
    assert served.http.get("/readyz").status_code == 200


@contextlib.contextmanager
def hanging_redis() -> Iterator[str]:
    """A redis:// URL whose server accepts connections and never answers: every feature fetch
    waits out the client's timeout (2 s), as against a Redis that hangs."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(64)  # never accepted: the kernel completes the handshakes, no reply
        yield f"redis://127.0.0.1:{listener.getsockname()[1]}/0"


def test_an_overloaded_replica_sheds_at_once_with_503_and_retry_after(served: Served) -> None:
    """One request running and one queued are all a replica of this app takes; with the online
    store hanging, the rest of a burst is refused at once (503, Retry-After) instead of queueing
    behind 2 s fetches, and the admitted ones still get their own answer."""
    burst = 8
    with hanging_redis() as redis_url:
        _settings, url = _side_app(
            served,
            "shed",
            redis_url=redis_url,
            serve_max_ongoing_requests=1,
            serve_max_queued_requests=1,
            serve_retry_after_s=3,
        )
        try:
            # The model loads from MLflow; only the online store hangs.
            _wait_for(lambda: httpx.get(f"{url}/model", timeout=10), 200, 120)

            async def one(http: httpx.AsyncClient) -> tuple[int, float, str, str | None]:
                started = time.monotonic()
                response = await http.post("/predict", json=BODY)
                return (
                    response.status_code,
                    time.monotonic() - started,
                    response.text,
                    response.headers.get("retry-after"),
                )

            async def all_at_once() -> list[tuple[int, float, str, str | None]]:
                limits = httpx.Limits(max_connections=burst)
                async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as http:
                    return await asyncio.gather(*(one(http) for _ in range(burst)))

            outcomes = asyncio.run(all_at_once())
        finally:
            _remove_side_app(served, "shed")
    shed = [o for o in outcomes if "backpressure" in o[2]]
    admitted = [o for o in outcomes if "backpressure" not in o[2]]
    summary = [(status, round(seconds, 2), text[:60]) for status, seconds, text, _r in outcomes]
    # Serve may refuse a little more than the cap (it yields to its event loop between counting
    # and admitting), never less: at most one running and one queued get through.
    assert 1 <= len(admitted) <= 2 and len(shed) >= burst - 2, summary
    assert all(status == 503 and retry == "3" for status, _s, _t, retry in shed), summary
    # Refused without waiting for the store: well under one 2 s fetch.
    assert max(seconds for _st, seconds, _t, _r in shed) < 1.0, summary
    # The admitted ones waited for the store and were told it is the store.
    assert all(
        status == 503 and "online store unavailable" in text and seconds >= 1.9
        for status, seconds, text, _r in admitted
    ), summary


def test_mlflow_down_at_start_reports_why_not_ready(served: Served) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    _settings, url = _side_app(served, "nomlflow", mlflow_tracking_uri=dead)
    try:
        ready = httpx.get(f"{url}/readyz", timeout=10)
        assert ready.status_code == 503
        reason = ready.json()["checks"]["model"]
        assert "no model loaded" in reason and dead.split("//")[1] in reason, reason
        assert ready.json()["checks"]["redis"] == "ok"
        assert httpx.post(f"{url}/predict", json=BODY, timeout=10).status_code == 503
        print(f"replica with MLflow down was up in {time.monotonic() - started:.1f}s")
    finally:
        _remove_side_app(served, "nomlflow")


def test_mlflow_down_later_keeps_serving_the_current_model(served: Served) -> None:
    version = served.champion_version()
    assert stack.down(served.settings, services=["mlflow"]) == ["mlflow"]
    try:
        deadline = time.monotonic() + 10 * POLL_S + 30
        while not (info := served.http.get("/model").json()).get("last_poll_error"):
            assert time.monotonic() < deadline, f"the failed poll was never reported: {info}"
            time.sleep(0.5)
        assert info["version"] == version
        answered = served.http.post("/predict", json=BODY)
        assert answered.status_code == 200 and answered.json()["model_version"] == version
        assert served.http.get("/readyz").status_code == 200
    finally:
        stack.up(served.settings, services=["mlflow"])
    deadline = time.monotonic() + 10 * POLL_S + 30
    while served.http.get("/model").json().get("last_poll_error"):
        assert time.monotonic() < deadline, "the poll error stayed after MLflow came back"
        time.sleep(0.5)


def _wait_rejected(served: Served, version: str) -> str:
    deadline = time.monotonic() + 10 * POLL_S + 30
    while True:
        info = served.http.get("/model").json()
        assert info["version"] != version, f"version {version} was loaded and served"
        reason = info["rejected_versions"].get(version) or info.get("last_poll_error")
        if reason:
            return str(reason)
        assert time.monotonic() < deadline, f"version {version} was neither loaded nor refused"
        time.sleep(0.5)


def test_a_version_of_another_feature_set_is_refused_and_the_old_one_serves(
    served: Served,
) -> None:
    """(The registry already refuses to register a booster with other feature names.)"""
    from tests.test_serving import tiny_booster

    before = served.champion_version()
    info = registry.log_and_register(
        tiny_booster(4), params={}, metrics={}, settings=served.settings
    )
    version = info.version
    registry.client(served.settings).set_model_version_tag(
        MODEL_NAME, version, registry.FEATURE_SET_VERSION_TAG, "v0-older"
    )
    registry.promote(version, served.settings)
    try:
        reason = _wait_rejected(served, version)
        assert "trained on feature set v0-older" in reason, reason
        answered = served.http.post("/predict", json=BODY)
        assert answered.status_code == 200 and answered.json()["model_version"] == before
    finally:
        registry.promote(before, served.settings)


def test_a_corrupt_artifact_is_reported_and_the_old_model_serves(
    served: Served, tmp_path: Path
) -> None:
    from tests.test_serving import tiny_booster

    before = served.champion_version()
    good = registry.log_and_register(
        tiny_booster(5), params={}, metrics={}, settings=served.settings
    )
    # A copy of a real model whose data file is garbage, as a new version of its own run.
    local = Path(
        mlflow.artifacts.download_artifacts(
            artifact_uri=registry.download_uri(good.model_uri, served.settings),
            dst_path=str(tmp_path),
            tracking_uri=served.settings.mlflow_uri,
        )
    )
    data = [p for p in local.iterdir() if p.suffix in (".ubj", ".json", ".xgb", ".deprecated")]
    assert data and (local / "MLmodel").exists(), list(local.iterdir())
    for path in data:
        path.write_bytes(b"\x00not a model\xff" * 10)
    client = registry.client(served.settings)
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.log_artifacts(run.info.run_id, str(local), artifact_path="model")
    client.set_terminated(run.info.run_id)
    version = client.create_model_version(
        MODEL_NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id
    ).version
    registry.promote(version, served.settings)
    try:
        reason = _wait_rejected(served, version)
        assert reason, "a corrupt model must be reported"
        answered = served.http.post("/predict", json=BODY)
        assert answered.status_code == 200 and answered.json()["model_version"] == before
        assert served.http.get("/model").json()["version"] == before
    finally:
        registry.promote(before, served.settings)


def test_haproxy_sends_no_log_datagram_per_request_for_metrics(served: Served) -> None:
    """The ingress this head runs has HAProxy's request metrics off (serve_ingress_env says
    why): no frontend logs each request to the HAProxyManager's metrics socket. Read from the
    config Ray generated, so a Ray that renames or ignores the setting fails here."""
    from easymlops.services.ray import haproxy_dir

    configs = sorted(haproxy_dir(served.settings).glob("*/haproxy.cfg"))
    assert configs, f"no HAProxy config under {haproxy_dir(served.settings)}"
    config = configs[-1].read_text()
    assert "frontend http_frontend" in config  # Serve's ingress config, with its HTTP frontend
    assert "metrics.sock" not in config
    assert "log-format-sd" not in config


def test_a_hung_replica_gets_an_error_after_the_timeout_not_a_hang(served: Served) -> None:
    """A replica that cannot answer at all (stopped by the kernel here; a deadlock or a VM
    paused for long would do the same) holds no request past HAProxy's server timeout, and
    serves again once it runs. Without that timeout HAProxy waits for it indefinitely."""
    from easymlops.services.ray import haproxy_timeout_server_s

    _settings, url = _side_app(served, "hung")
    try:
        _wait_for(lambda: httpx.get(f"{url}/model", timeout=10), 200, 120)
        (pid,) = replica_pids(served.settings, "purchase-hung")
        limit = haproxy_timeout_server_s(served.settings)
        os.kill(pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            try:
                answer = httpx.post(f"{url}/predict", json=BODY, timeout=limit + 15)
            except httpx.TimeoutException:
                pytest.fail(f"a request to the stopped replica hung for {limit + 15} s")
            waited = time.monotonic() - started
        finally:
            os.kill(pid, signal.SIGCONT)
        # Serve's HAProxy config turns HAProxy's 504 into a plain-text 500.
        assert answer.status_code == 500, answer.text
        assert limit - 1 <= waited <= limit + 5, waited
        # HAProxy's health checks marked the stopped replica down; it takes it back after two
        # good checks (`rise 2`, up to ~10 s), meanwhile /hung/ may not be routed at all.
        _wait_for(lambda: httpx.post(f"{url}/predict", json=BODY, timeout=10), 200, 30)
        assert replica_pids(served.settings, "purchase-hung") == {
            pid
        }  # the same replica, running again
    finally:
        _remove_side_app(served, "hung")


# Last: it replaces the module's replica.
def test_a_killed_replica_is_replaced_and_no_request_hangs(served: Served) -> None:
    (pid,) = replica_pids(served.settings)
    os.kill(pid, signal.SIGKILL)
    statuses: list[int | str] = []
    deadline = time.monotonic() + 120
    # Serve answers a request it cannot place within serve_request_timeout_s (10 s) with an
    # error; a client still waiting after 20 s would be a hang.
    with httpx.Client(base_url=served.url, timeout=20.0) as http:
        while time.monotonic() < deadline:
            started = time.monotonic()
            try:
                status: int | str = http.post("/predict", json=BODY).status_code
            except httpx.TimeoutException as exc:
                pytest.fail(f"a request hung for {time.monotonic() - started:.0f}s: {exc!r}")
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            statuses.append(status)
            if status == 200 and replica_pids(served.settings) - {pid}:
                break
            time.sleep(0.2)
    assert statuses[-1] == 200, f"no answer from a new replica within 120 s: {statuses[-20:]}"
    (new_pid,) = replica_pids(served.settings)
    assert new_pid != pid
    print(f"replica replaced after {len(statuses)} requests: {sorted(set(map(str, statuses)))}")
