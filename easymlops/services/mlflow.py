"""The MLflow tracking server, in the profile's mode: embedded (runs and registry in SQLite,
artifacts in its data folder) or production-local (database `mlflow` on the stack's PostgreSQL,
artifacts in the stack's S3). Clients upload and download artifacts through the server
(`--serve-artifacts`, mlflow-artifacts:/ URIs), so only the server needs the store's access."""

from __future__ import annotations

from urllib.parse import quote

from easymlops.services import postgres, seaweedfs
from easymlops.services.supervisor import Launch, Spec, data_dir, http_ok, python_module
from easymlops.settings import Settings

#: MLflow's own database on the production-local PostgreSQL.
DATABASE = "mlflow"


def _launch(settings: Settings) -> Launch:
    argv = [
        *python_module("mlflow", "mlflow"),
        "server",
        "--host",
        settings.host,
        "--port",
        str(settings.mlflow_port),
        "--workers",
        "1",
        "--serve-artifacts",
    ]
    # MLflow 3 otherwise starts a job runner with seven huey consumers (~500 MB) for GenAI
    # scorer jobs that this platform does not use.
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    if settings.profile == "production-local":
        # The backend URI carries the password: through the environment, never the command line.
        # +psycopg2: SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3 (not installed).
        backend = (
            f"postgresql+psycopg2://{quote(settings.pg_user, safe='')}:"
            f"{quote(postgres.password(settings), safe='')}"
            f"@{settings.pg_host}:{settings.pg_port}/{DATABASE}"
        )
        env |= {
            "MLFLOW_BACKEND_STORE_URI": backend,
            "MLFLOW_ARTIFACTS_DESTINATION": f"s3://{settings.s3_bucket}/mlflow",
            **seaweedfs.client_env(settings),
        }
        return Launch(argv, env)
    data = data_dir(settings, "mlflow")
    argv += [
        "--backend-store-uri",
        f"sqlite:///{data / 'mlflow.db'}",
        "--artifacts-destination",
        str(data / "artifacts"),
    ]
    return Launch(argv, env)


def _prepare(settings: Settings) -> None:
    if settings.profile == "production-local":
        postgres.create_database(settings, DATABASE)


def health(settings: Settings) -> str | None:
    uri = settings.mlflow_uri
    if not uri.startswith(("http://", "https://")):
        return None  # a file or database store: there is no server to probe
    return http_ok(f"{uri.rstrip('/')}/health")


SERVICES = (
    Spec(
        name="mlflow",
        rank=30,
        url=lambda s: s.mlflow_uri,
        health=health,
        launch=_launch,
        port_fields=lambda _s: ("mlflow_port",),
        # Only in production-local, where those two are part of `up`.
        needs=("postgres", "s3"),
        external=lambda s: s.mlflow_tracking_uri,
        prepare=_prepare,
        # The first start creates the schema (alembic; in PostgreSQL slow on 2 cores).
        start_timeout=240.0,
        stop_grace=10.0,
    ),
)
