"""The model a replica serves: loads the MLflow `champion` and hot-swaps it when the alias moves.

A background thread (not an asyncio task) polls the registry, because loading a model is
blocking MLflow I/O that must never stall the request event loop; the swap is one reference
assignment, so a request sees either the old or the new model, never a mix.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import redis
import xgboost

from easymlops import registry
from easymlops.features import FEATURE_SET_VERSION, META_KEY, MODEL_FEATURES
from easymlops.settings import Settings

# A child of "ray.serve" so swaps land in the replica's Serve log with its context.
log = logging.getLogger("ray.serve.easymlops")


@dataclass(frozen=True, slots=True)
class ServingConfig:
    """Everything a replica needs, passed as deployment init args so a replica never depends on
    the environment of the process that deployed it."""

    mlflow_uri: str
    redis_url: str
    model_name: str
    champion_alias: str
    poll_interval_s: float = 10.0
    redis_timeout_s: float = 2.0
    # settings.serve_debug_features: responses carry the feature values used
    debug_features: bool = False
    # Where each prediction is logged (serving.prediction_log); empty bootstrap = not logged.
    kafka_bootstrap: str = ""
    predictions_topic: str = "predictions"
    prediction_queue_size: int = 100_000
    # settings.canary_percent of requests go to the challenger alias's version.
    challenger_alias: str = "challenger"
    canary_percent: float = 0.0
    # settings.serve_api_key ("" = no key); kept out of repr so it is never logged.
    api_key: str = field(default="", repr=False)
    max_body_bytes: int = 1_048_576
    # Where spans go over OTLP/HTTP (the deployer's OTEL_EXPORTER_OTLP_ENDPOINT); "" = nowhere.
    otlp_endpoint: str = ""
    # settings.serve_batch_max_size / serve_batch_wait_ms: @serve.batch on /predict (0 = off).
    batch_max_size: int = 0
    batch_wait_s: float = 0.002

    @classmethod
    def from_settings(cls, settings: Settings, *, poll_interval_s: float = 10.0) -> ServingConfig:
        return cls(
            mlflow_uri=settings.mlflow_uri,
            redis_url=settings.redis,
            model_name=settings.model_name,
            champion_alias=settings.champion_alias,
            poll_interval_s=poll_interval_s,
            debug_features=settings.serve_debug_features,
            kafka_bootstrap=settings.bootstrap_servers if settings.serve_log_predictions else "",
            predictions_topic=settings.topic_predictions,
            prediction_queue_size=settings.serve_prediction_queue_size,
            challenger_alias=settings.challenger_alias,
            canary_percent=settings.canary_percent,
            api_key=settings.serve_api_key.get_secret_value(),
            max_body_bytes=settings.serve_max_body_bytes,
            otlp_endpoint=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
            batch_max_size=settings.serve_batch_max_size,
            batch_wait_s=settings.serve_batch_wait_ms / 1000,
        )

    def settings(self) -> Settings:
        # Explicit init values win over any EASYMLOPS_* variables the replica might inherit.
        return Settings(
            mlflow_tracking_uri=self.mlflow_uri,
            redis_url=self.redis_url,
            model_name=self.model_name,
            champion_alias=self.champion_alias,
            serve_debug_features=self.debug_features,
        )


# MLflow's client retries a failed call 7 times with exponential backoff and waits 120 s per
# call: a replica started while MLflow is down would sit in its constructor for ~4 minutes
# (measured: 247 s) and Serve would report it as failing to start. Serving only needs the
# answer "not now", and the poller asks again every poll_interval_s anyway. Defaults only: an
# operator's own MLFLOW_HTTP_* variables in the replica's environment win.
MLFLOW_CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


@dataclass(frozen=True, slots=True)
class LoadedModel:
    info: registry.RegisteredModel
    booster: xgboost.Booster
    loaded_at: datetime

    @property
    def feature_set_version(self) -> str:
        return self.info.feature_set_version or FEATURE_SET_VERSION

    def predict(self, matrix: np.ndarray) -> np.ndarray:
        """Probabilities for rows in MODEL_FEATURES order (serving.features.to_matrix).

        `inplace_predict` rather than a DMatrix: half the time for the one-row calls serving
        makes (0.39 vs 0.81 ms per row here, see benchmarks/README.md), same results. It
        does not check feature names, so the width is checked here and the names once, at load
        (check_compatible)."""
        if matrix.ndim != 2 or matrix.shape[1] != len(MODEL_FEATURES):
            raise ValueError(f"expected rows of {len(MODEL_FEATURES)} features, got {matrix.shape}")
        scores = self.booster.inplace_predict(matrix, missing=math.nan)
        return np.clip(np.asarray(scores), 0.0, 1.0)


def check_compatible(info: registry.RegisteredModel, booster: xgboost.Booster) -> str | None:
    """Why this model cannot be served by this code, or None if it can."""
    names = tuple(booster.feature_names or ())
    if names != MODEL_FEATURES:
        return f"model features {list(names)} differ from serving's MODEL_FEATURES"
    if info.feature_set_version not in (None, FEATURE_SET_VERSION):
        return (
            f"model was trained on feature set {info.feature_set_version}, "
            f"serving computes {FEATURE_SET_VERSION}"
        )
    return None


@dataclass
class ModelState:
    """What /readyz and /model report besides the model itself."""

    last_error: str | None = None
    rejected: dict[str, str] = field(default_factory=dict)  # version -> reason
    store_feature_set_version: str | None = None
    last_poll: datetime | None = None


class ChampionWatcher:
    """Holds the current model and keeps it in step with a registry alias (the champion's,
    unless `alias` names another, e.g. the challenger for a canary)."""

    def __init__(self, config: ServingConfig, alias: str | None = None) -> None:
        for name, value in MLFLOW_CLIENT_ENV.items():
            os.environ.setdefault(name, value)
        self.config = config
        self.alias = alias or config.champion_alias
        self._settings = config.settings()
        self._model: LoadedModel | None = None
        self.state = ModelState()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"{self.alias}-watcher", daemon=True)
        self._redis = redis.Redis.from_url(
            config.redis_url,
            decode_responses=True,
            socket_timeout=config.redis_timeout_s,
            socket_connect_timeout=config.redis_timeout_s,
        )

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def start(self) -> None:
        """Try once synchronously, so a replica with a champion is ready as soon as it is up,
        then poll in the background. A failed first try is not fatal: the replica starts and
        answers 503 until a model appears."""
        self.poll_once()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while not self._stop.wait(self.config.poll_interval_s):
            self.poll_once()

    def poll_once(self) -> None:
        """One look at the registry and the online store's metadata; never raises."""
        try:
            self._refresh_model()
            self.state.last_error = None
        except Exception as exc:  # the poller must survive MLflow outages and bad models
            self.state.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("model poll failed: %s", self.state.last_error)
        try:
            meta: dict[str, str] = self._redis.hgetall(META_KEY)  # type: ignore[assignment]
            self.state.store_feature_set_version = meta.get("feature_set_version") or None
        except redis.RedisError as exc:
            log.warning("cannot read %s from redis: %s", META_KEY, exc)
        self.state.last_poll = datetime.now(UTC)

    def _refresh_model(self) -> None:
        info = registry.aliased(self._settings, self.alias)
        current = self._model
        if info is None:
            if current is not None:
                # A missing alias is more likely an operator mistake than a request to stop
                # serving; keep the last good model (rollback is done by moving the alias).
                log.warning(
                    "alias %s of %s is gone; keeping version %s",
                    self.alias,
                    self.config.model_name,
                    current.info.version,
                )
            return
        if current is not None and current.info.version == info.version:
            return
        if info.version in self.state.rejected:
            return
        booster = registry.load_booster(info.model_uri, self._settings)
        # One thread per prediction: a request scores one row (or a small batch), where
        # OpenMP's thread wake-ups cost more than they save; replicas scale out instead.
        booster.set_param({"nthread": 1})
        reason = check_compatible(info, booster)
        if reason is not None:
            self.state.rejected[info.version] = reason
            log.error("refusing %s version %s: %s", info.name, info.version, reason)
            return
        self._model = LoadedModel(info=info, booster=booster, loaded_at=datetime.now(UTC))
        log.info(
            "hot-swapped %s: version %s -> %s (run %s)",
            info.name,
            current.info.version if current else "none",
            info.version,
            info.run_id,
        )

    def not_ready_reason(self) -> str | None:
        """Why /predict would fail right now because of the model, or None."""
        if self._model is not None:
            return None
        alias = f"{self.config.model_name}@{self.alias}"
        if self.state.last_error:
            return f"no model loaded: {alias}: {self.state.last_error}"
        if self.state.rejected:
            return f"no model loaded: {alias} rejected: {self.state.rejected}"
        return f"no model loaded: no version of {self.config.model_name} has alias {self.alias}"

    def store_mismatch(self) -> str | None:
        """Non-None when the online store holds features of another feature-set version, which
        the model would silently misread."""
        stored = self.state.store_feature_set_version
        if stored is None or stored == FEATURE_SET_VERSION:
            return None
        return (
            f"online store holds feature set {stored}, serving computes {FEATURE_SET_VERSION}; "
            "re-materialize the online store"
        )
