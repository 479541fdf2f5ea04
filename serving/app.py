"""The Ray Serve application: a FastAPI ingress that reads features from Redis, scores them with
the MLflow `champion` booster and hot-reloads that booster when the alias moves.

HTTP contract (DESIGN.md section 5): POST /predict, POST /predict/batch, GET /healthz, /readyz,
/model, /metrics. Bad input -> 422 naming each field and reason; no model, unreachable online
store or a feature-set mismatch -> 503 with the reason.

A request scores the cart at its `event_time` (and `event_id`, when known): session features
count only the session's events strictly before that cart, in the offline order (time, funnel
rank, event id), so events streamed after it (the cart itself, a later purchase) never leak in.
A request without `event_time` is scored at its arrival time (UTC now, taken when the request
reaches the replica). With settings.serve_debug_features (ServingConfig.debug_features) each
prediction also carries `features`: the value of every model feature used, null where missing.
"""

# No `from __future__ import annotations` here: Serve's ingress re-binds the endpoint methods and
# FastAPI then cannot resolve string annotations, so `body: PredictRequest` silently became a
# required *query* parameter (every POST got a 422 "query.body: Field required").

import asyncio
import functools
import gc
import hmac
import logging
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np
import orjson
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI, HTTPException, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from easymlops.features import FEATURE_SET_VERSION, MODEL_FEATURES
from serving.features import (
    FeatureRow,
    assemble_row,
    feature_values,
    redis_keys,
    session_features,
    to_matrix,
)
from serving.metrics import CONTENT_TYPE, serving_metrics
from serving.model import ChampionWatcher, LoadedModel, ServingConfig
from serving.prediction_log import PredictionLog
from serving.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorBody,
    ModelInfo,
    PredictRequest,
    PredictResponse,
    Readiness,
    ValidationErrorBody,
)
from serving.tracing import ASGI_HEADERS, PROPAGATOR, traceparent
from serving.tracing import tracer_provider as make_tracer_provider

log = logging.getLogger("ray.serve.easymlops")

DEPLOYMENT_NAME = "PurchasePredictor"
# Answered without the API key: what load balancers and Serve's own checks probe.
OPEN_PATHS = frozenset({"/healthz"})
# The status counted for a request whose client went away before its answer (NGINX's code).
CLIENT_CLOSED_REQUEST = 499

# The error responses each route declares in the OpenAPI spec, so that generated clients and the
# contract tests (tests/test_serving_contract.py) know the bodies the app really sends.
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorBody, "description": "API key missing or wrong (EASYMLOPS_SERVE_API_KEY)"}
}
NOT_READY: dict[int | str, dict[str, Any]] = {
    503: {"model": ErrorBody, "description": "no model loaded, or the online store unreachable"}
}
SCORING_ERRORS: dict[int | str, dict[str, Any]] = {
    **UNAUTHORIZED,
    **NOT_READY,
    413: {"model": ErrorBody, "description": "body larger than EASYMLOPS_SERVE_MAX_BODY_BYTES"},
    422: {"model": ValidationErrorBody, "description": "each bad field and why"},
}


def _field(loc: Sequence[int | str]) -> str:
    """`["body", "requests", 3, "user_id"]` -> `requests[3].user_id` (the body itself: `body`)."""
    parts = list(loc[1:]) if loc and loc[0] == "body" else list(loc)
    text = ""
    for part in parts:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "body"


def _error(err: dict[str, Any]) -> dict[str, Any]:
    loc = list(err.get("loc", ()))
    kind = str(err.get("type", "invalid"))
    field, reason = _field(loc), str(err.get("msg", "invalid"))
    if kind == "json_invalid":  # loc is ["body", <character offset>]
        position = loc[-1] if len(loc) > 1 else "?"
        detail = (err.get("ctx") or {}).get("error", "")
        field, reason = "body", f"invalid JSON at character {position}: {detail}".rstrip(": ")
    elif loc == ["body"] and kind in ("model_attributes_type", "dict_type", "missing"):
        reason = "request body must be a JSON object sent with Content-Type: application/json"
    return {"field": field, "reason": reason, "type": kind, "loc": loc}


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    """422 whose body names each bad field and why, without echoing the input back (FastAPI's
    default includes `input`, which can be large or sensitive)."""
    assert isinstance(exc, RequestValidationError)
    errors = [_error(err) for err in exc.errors()]
    message = "; ".join(f"{e['field']}: {e['reason']}" for e in errors)
    return JSONResponse(
        status_code=422, content={"detail": errors, "message": f"invalid request: {message}"}
    )


async def _http_error(request: Request, exc: Exception) -> Response:
    """FastAPI answers a JSON body that is not UTF-8 with an undeclared 400 "error parsing the
    body"; it is bad input like any other invalid JSON, so it gets the same 422 naming the body."""
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
        error = {
            "field": "body",
            "reason": "request body is not UTF-8 encoded JSON",
            "type": "json_invalid",
            "loc": ["body"],
        }
        message = f"invalid request: body: {error['reason']}"
        return JSONResponse(status_code=422, content={"detail": [error], "message": message})
    return await http_exception_handler(request, exc)


def _json(status: int, detail: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    body = orjson.dumps({"detail": detail})
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *headers,
    ]
    return {
        "start": {"type": "http.response.start", "status": status, "headers": headers},
        "body": {"type": "http.response.body", "body": body},
    }


class Edge:
    """The one ASGI middleware in front of the routes (plain ASGI, not Starlette's
    BaseHTTPMiddleware, which costs a task and a memory stream per request): the server span
    continuing the caller's `traceparent`, the trace headers of the response, the API key, the
    body limit and the request metrics."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        config: ServingConfig,
        tracer: trace.Tracer,
        route_paths: Callable[[], frozenset[str]],
    ) -> None:
        self.app = app
        self.tracer = tracer
        # The app's own paths, for the metrics of a request that ended before routing did.
        self.route_paths = route_paths
        self.max_body = config.max_body_bytes
        self.expected = f"Bearer {config.api_key}".encode() if config.api_key else None

    def _authorized(self, headers: dict[str, str], path: str) -> bool:
        if self.expected is None or path in OPEN_PATHS:
            return True
        given = headers.get("authorization", "").encode()
        return hmac.compare_digest(given, self.expected)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        root = scope.get("root_path", "")
        path = (
            scope["path"][len(root) :] if root and scope["path"].startswith(root) else scope["path"]
        )
        context = PROPAGATOR.extract(headers, getter=ASGI_HEADERS)
        status = 500
        client_gone = False

        async def receive_watched() -> Message:
            nonlocal client_gone
            message = await receive()
            if message["type"] == "http.disconnect":
                client_gone = True
            return message

        with self.tracer.start_as_current_span(
            f"{scope['method']} {path}", context=context, kind=trace.SpanKind.SERVER
        ) as span:
            trace_headers = [
                (b"traceparent", traceparent(span).encode()),
                (b"x-trace-id", f"{span.get_span_context().trace_id:032x}".encode()),
            ]

            async def send_with_trace(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                    message = {**message, "headers": [*message.get("headers", []), *trace_headers]}
                await send(message)

            try:
                refusal = await self._refusal(headers, path, receive_watched, trace_headers)
                if isinstance(refusal, dict):
                    status = refusal["start"]["status"]
                    await send(refusal["start"])
                    await send(refusal["body"])
                else:
                    await self.app(scope, refusal, send_with_trace)
            except asyncio.CancelledError:
                # Serve cancels the handler when the client disconnects (and when its own
                # request timeout passes, which it answers 408 itself).
                client_gone = True
                raise
            finally:
                if client_gone:
                    # Whatever the app answered reached no one: "client closed request", as
                    # NGINX and Serve's proxy count it, so a client's timeout is not a 5xx.
                    status = CLIENT_CLOSED_REQUEST
                span.set_attribute("http.response.status_code", status)
                route = scope.get("route")
                # The route template, not the raw path: unknown paths must not create series.
                # A request cancelled before routing still counts under its path if it is one
                # of the app's.
                endpoint = getattr(route, "path", None) or (
                    path if path in self.route_paths() else "unmatched"
                )
                metrics = serving_metrics()
                metrics.requests.labels(endpoint, scope["method"], str(status)).inc()
                metrics.latency.labels(endpoint).observe(time.perf_counter() - started)

    async def _refusal(
        self,
        headers: dict[str, str],
        path: str,
        receive: Receive,
        trace_headers: list[tuple[bytes, bytes]],
    ) -> dict[str, Any] | Receive:
        """A 401/413 response to send instead of the app's, or the `receive` the app reads."""
        if not self._authorized(headers, path):
            return _json(
                401,
                "missing or wrong API key: send the header `Authorization: Bearer <key>`",
                [(b"www-authenticate", b"Bearer"), *trace_headers],
            )
        too_large = _json(
            413,
            f"request body larger than the limit of {self.max_body} bytes "
            "(EASYMLOPS_SERVE_MAX_BODY_BYTES); send fewer rows per /predict/batch call",
            trace_headers,
        )
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body:
            return too_large
        # Read the body here (bounded) so a chunked body without a length is limited too; the
        # app then gets it replayed as one message.
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # client went away: let the app see it
                return _replay([], message, receive)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return too_large
            chunks.append(chunk)
            if not message.get("more_body", False):
                return _replay(chunks, None, receive)


def _replay(chunks: list[bytes], last: Message | None, receive: Receive) -> Receive:
    pending: Message | None = (
        last if last is not None else {"type": "http.request", "body": b"".join(chunks)}
    )

    async def replayed() -> Message:
        nonlocal pending
        if pending is not None:
            message, pending = pending, None
            return message
        return await receive()

    return replayed


class Predictor:
    """The request path of one replica: a ChampionWatcher for the model, an async Redis client
    for features, the prediction log. Plain Python: `PurchasePredictor` runs it under Serve,
    and `build_app(Predictor(config))` under any ASGI server (the bare baseline of
    benchmarks/serving.py, the in-process tracing tests)."""

    def __init__(
        self,
        config: ServingConfig,
        fingerprint: str = "",
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        self.config = config
        self.fingerprint = fingerprint  # lets `deploy` skip redeploying an identical app
        self.tracer_provider = tracer_provider or make_tracer_provider(config.otlp_endpoint)
        self.tracer = self.tracer_provider.get_tracer("serving.app")
        self.watcher = ChampionWatcher(config)
        self.watcher.start()
        # The canary: a second watcher on the challenger alias, only when a share is set.
        self.challenger = (
            ChampionWatcher(config, alias=config.challenger_alias)
            if config.canary_percent > 0
            else None
        )
        if self.challenger is not None:
            self.challenger.start()
        self._canary_draws = random.Random()
        # What /predict calls: one request scored alone (PurchasePredictor may batch them).
        self.score_one: Callable[[PredictRequest], Awaitable[PredictResponse]] = self._score_alone
        self._redis: aioredis.Redis | None = None
        self.prediction_log = (
            PredictionLog(
                config.kafka_bootstrap, config.predictions_topic, config.prediction_queue_size
            )
            if config.kafka_bootstrap
            else None
        )
        self.current_model()
        # Everything alive now (modules, clients, the first model) lives as long as the
        # replica: freeze it out of the cyclic GC. Otherwise each full collection walks those
        # ~300k objects again, a 227 ms pause every 20-40 s under load that queued ~1% of the
        # requests behind it (the soak's p99); frozen, a full collection takes 1-3 ms.
        gc.freeze()
        log.info(
            "serving %s@%s from %s, features from %s, poll every %ss",
            config.model_name,
            config.champion_alias,
            config.mlflow_uri,
            config.redis_url.split("@")[-1],  # never log a password in the URL
            config.poll_interval_s,
        )

    def check_health(self) -> None:
        """Serve restarts the replica if this raises: only a dead poller warrants that (no model
        is a normal, reported state, not a reason to restart)."""
        if not self.watcher.alive():
            raise RuntimeError("champion watcher thread died")
        if self.challenger is not None and not self.challenger.alive():
            raise RuntimeError("challenger watcher thread died")

    def close(self) -> None:
        self.watcher.stop()
        if self.challenger is not None:
            self.challenger.stop()
        if self.prediction_log is not None:
            self.prediction_log.close(timeout=5)
        self.tracer_provider.shutdown()

    # ---- helpers -------------------------------------------------------------------------
    def _redis_client(self) -> aioredis.Redis:
        # Created on first use inside the replica's request event loop, which owns its sockets.
        if self._redis is None:
            self._redis = aioredis.Redis.from_url(
                self.config.redis_url,
                decode_responses=True,
                socket_timeout=self.config.redis_timeout_s,
                socket_connect_timeout=self.config.redis_timeout_s,
            )
        return self._redis

    def current_model(self) -> LoadedModel | None:
        """The model serving now (None before the first load); keeps the model gauges on it."""
        model = self.watcher.model
        if model is not None:
            serving_metrics().set_model(
                model.info.name, model.info.version, model.feature_set_version
            )
        return model

    def _require_model(self) -> LoadedModel:
        model = self.current_model()
        if model is None:
            raise HTTPException(status_code=503, detail=self.watcher.not_ready_reason())
        mismatch = self.watcher.store_mismatch()
        if mismatch is not None:
            raise HTTPException(status_code=503, detail=mismatch)
        return model

    def _canary(self, champion: LoadedModel) -> LoadedModel:
        """The challenger for canary_percent of calls (when it is another loaded version)."""
        if self.challenger is None:
            return champion
        challenger = self.challenger.model
        if challenger is None or challenger.info.version == champion.info.version:
            return champion
        if self._canary_draws.random() * 100 < self.config.canary_percent:
            return challenger
        return champion

    async def _fetch(
        self, requests: Sequence[PredictRequest], arrived: datetime
    ) -> list[FeatureRow]:
        """All feature hashes of all requests in one pipeline round trip; a request without
        event_time is scored at `arrived`."""
        with self.tracer.start_as_current_span("feature_fetch") as span:
            span.set_attribute("easymlops.rows", len(requests))
            pipe = self._redis_client().pipeline(transaction=False)
            for req in requests:
                for key in redis_keys(req.user_id, req.product_id, req.user_session):
                    pipe.hgetall(key)
            try:
                hashes: list[Any] = await pipe.execute()
            except redis.RedisError as exc:
                span.set_status(trace.StatusCode.ERROR, type(exc).__name__)
                raise HTTPException(
                    status_code=503,
                    detail=f"online store unavailable: {type(exc).__name__}: {exc}",
                ) from None
            rows = []
            for i, req in enumerate(requests):
                user, product, session = hashes[3 * i : 3 * i + 3]
                at = req.event_time or arrived
                rows.append(
                    assemble_row(
                        req.request_features(),
                        user,
                        product,
                        session_features(session, req.product_id, at, req.event_id),
                    )
                )
            return rows

    async def _score_alone(self, request: PredictRequest) -> PredictResponse:
        return (await self.score([request]))[0]

    async def score(self, requests: Sequence[PredictRequest]) -> list[PredictResponse]:
        arrived = datetime.now(UTC)  # the moment of a request without event_time
        model = self._canary(self._require_model())  # one model for the whole call
        request_span = trace.get_current_span()
        request_span.set_attribute("easymlops.model_version", model.info.version)
        rows = await self._fetch(requests, arrived)
        with self.tracer.start_as_current_span("model") as span:
            span.set_attribute("easymlops.model_version", model.info.version)
            span.set_attribute("easymlops.rows", len(rows))
            probabilities = model.predict(to_matrix(rows))
        with self.tracer.start_as_current_span("response"):
            responses = self._responses(model, requests, rows, probabilities, arrived)
        request_span.set_attribute("easymlops.request_ids", [r.request_id for r in responses])
        return responses

    def _responses(
        self,
        model: LoadedModel,
        requests: Sequence[PredictRequest],
        rows: Sequence[FeatureRow],
        probabilities: np.ndarray,
        arrived: datetime,
    ) -> list[PredictResponse]:
        metrics = serving_metrics()
        metrics.predictions.labels(model.info.name, model.info.version).inc(len(rows))
        metrics.model_call_rows.observe(len(rows))
        for row in rows:
            for name in row.missing:
                metrics.missing_features.labels(name).inc()
        debug = self.config.debug_features
        predicted_at = datetime.now(UTC).isoformat()
        responses = []
        for p, row, req in zip(probabilities, rows, requests, strict=True):
            response = PredictResponse(
                request_id=uuid.uuid4().hex,
                probability=float(p),
                model_name=model.info.name,
                model_version=model.info.version,
                missing_features=list(row.missing),
                feature_set_version=model.feature_set_version,
            )
            if debug:  # set only then: unset fields are left out of the response
                response.features = feature_values(row)
            if self.prediction_log is not None:
                self.prediction_log.send(
                    response.request_id,
                    {
                        "request_id": response.request_id,
                        "predicted_at": predicted_at,
                        "model_name": model.info.name,
                        "model_version": model.info.version,
                        "event_id": req.event_id,
                        "event_time": req.event_time.isoformat() if req.event_time else None,
                        "scored_at": (req.event_time or arrived).isoformat(),
                        "user_id": req.user_id,
                        "product_id": req.product_id,
                        "user_session": req.user_session,
                        "features": feature_values(row),
                        "probability": response.probability,
                    },
                )
            responses.append(response)
        return responses

    async def readiness(self) -> JSONResponse:
        """200 when a model, the online store and a matching feature set are there; else 503.
        Both carry a Readiness body."""
        checks: dict[str, str] = {}
        model = self.current_model()
        checks["model"] = (
            f"{model.info.name} version {model.info.version}"
            if model
            else str(self.watcher.not_ready_reason())
        )
        try:
            await self._redis_client().ping()
            checks["redis"] = "ok"
        except redis.RedisError as exc:
            checks["redis"] = f"unavailable: {type(exc).__name__}: {exc}"
        mismatch = self.watcher.store_mismatch()
        checks["feature_set"] = mismatch or f"ok ({FEATURE_SET_VERSION})"
        ready = model is not None and checks["redis"] == "ok" and mismatch is None
        return JSONResponse(
            status_code=200 if ready else 503,
            content={"status": "ready" if ready else "not ready", "checks": checks},
        )

    def model_info(self) -> ModelInfo:
        model = self.current_model()
        if model is None:
            raise HTTPException(status_code=503, detail=self.watcher.not_ready_reason())
        return ModelInfo(
            name=model.info.name,
            version=model.info.version,
            run_id=model.info.run_id,
            model_uri=model.info.model_uri,
            loaded_at=model.loaded_at,
            feature_names=list(model.booster.feature_names or MODEL_FEATURES),
            feature_set_version=model.feature_set_version,
            last_poll_error=self.watcher.state.last_error,
            rejected_versions=dict(self.watcher.state.rejected),
        )


def build_app(predictor: Predictor) -> FastAPI:
    """The HTTP API over one Predictor (DESIGN.md section 5)."""
    app = FastAPI(
        title="EasyMLOps purchase propensity",
        description="Probability that a cart event ends in a purchase of the product in the "
        "session.",
    )
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_middleware(
        Edge,
        config=predictor.config,
        tracer=predictor.tracer,
        route_paths=functools.cache(
            lambda: frozenset(getattr(route, "path", "") for route in app.routes)
        ),
    )

    @app.post(
        "/predict",
        response_model=PredictResponse,
        response_model_exclude_unset=True,
        responses=SCORING_ERRORS,
    )
    async def predict(body: PredictRequest) -> PredictResponse:
        return await predictor.score_one(body)

    @app.post(
        "/predict/batch",
        response_model=BatchResponse,
        response_model_exclude_unset=True,
        responses=SCORING_ERRORS,
    )
    async def predict_batch(body: BatchRequest) -> BatchResponse:
        return BatchResponse(predictions=await predictor.score(body.requests))

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive", "deployment": predictor.fingerprint}

    @app.get(
        "/readyz",
        response_model=Readiness,
        responses={**UNAUTHORIZED, 503: {"model": Readiness, "description": "what is missing"}},
    )
    async def readyz() -> JSONResponse:
        return await predictor.readiness()

    @app.get("/model", response_model=ModelInfo, responses={**UNAUTHORIZED, **NOT_READY})
    async def model_info() -> ModelInfo:
        return predictor.model_info()

    # Prometheus' text format, declared as text/plain in the spec; its 401 is still JSON.
    @app.get(
        "/metrics",
        response_class=PlainTextResponse,
        responses={
            401: {
                "description": UNAUTHORIZED[401]["description"],
                "content": {"application/json": {"schema": ErrorBody.model_json_schema()}},
            }
        },
    )
    async def metrics() -> Response:
        predictor.current_model()
        return Response(content=serving_metrics().render(), media_type=CONTENT_TYPE)

    return app


@serve.deployment(
    name=DEPLOYMENT_NAME,
    health_check_period_s=10,
    # Replicas, CPUs, request limits and the access log come from the settings, through
    # serving.deploy.deployment_options (the embedded stack and Kubernetes alike).
)
@serve.ingress()
class PurchasePredictor(Predictor):
    """The Predictor as a Serve deployment; its app is built in the replica, around itself.

    With ServingConfig.batch_max_size > 1, concurrent /predict calls go through @serve.batch
    (which works only inside a replica, hence here and not in Predictor)."""

    def __init__(
        self,
        config: ServingConfig,
        fingerprint: str = "",
        tracer_provider: TracerProvider | None = None,
    ) -> None:
        super().__init__(config, fingerprint, tracer_provider)
        if config.batch_max_size > 1:
            batched = serve.batch(
                max_batch_size=config.batch_max_size,
                batch_wait_timeout_s=config.batch_wait_s,
            )(self.score)
            self.score_one = batched

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_app(self)

    def __del__(self) -> None:
        self.close()
