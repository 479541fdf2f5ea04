"""Static checks of the deployment files (no Docker engine runs on this project's machines)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def test_compose_declares_every_platform_service() -> None:
    services = set(compose()["services"])
    assert {
        "kafka",
        "redis",
        "postgres",
        "minio",
        "mlflow",
        "ray-head",
        "validator",
        "dagster-code",
        "dagster-webserver",
        "dagster-daemon",
    } <= services


def test_compose_platform_env_names_are_real_settings() -> None:
    env = compose()["x-platform-env"]
    fields = {f"EASYMLOPS_{name.upper()}" for name in Settings.model_fields}
    used = {k for k in env if k.startswith("EASYMLOPS_")}
    assert used and used <= fields, used - fields


def test_no_secret_is_written_in_deployment_files() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    pattern = r"^\s*\w*(PASSWORD|SECRET\w*|ROOT_USER)\s*:\s*(\S+)"
    for match in re.finditer(pattern, text, flags=re.MULTILINE):
        assert match.group(2).startswith("${"), match.group(0)
    dagster_yaml = yaml.safe_load((ROOT / "infra/dagster/dagster.yaml").read_text())
    password = dagster_yaml["storage"]["postgres"]["postgres_db"]["password"]
    assert password == {"env": "POSTGRES_PASSWORD"}


def test_workspace_files_point_at_the_code_location() -> None:
    local = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    assert local["load_from"][0]["python_module"]["module_name"] == "easymlops_assets.definitions"
    remote = yaml.safe_load((ROOT / "infra/dagster/workspace.yaml").read_text())
    assert remote["load_from"][0]["grpc_server"]["host"] == "dagster-code"
