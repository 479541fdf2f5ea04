"""Checks of the deployment files that need no Docker engine (none runs on this project's
machines): docker-compose.yml against the compose-spec schema compose itself loads, the images
it builds, the commands it runs, the settings and packages they need, its service graph and
what it publishes."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "docker-compose.yml"
DAGSTER_YAML = ROOT / "infra/dagster/production-local/dagster.yaml"
POSTGRES_INIT = ROOT / "infra/postgres/create-databases.sh"
VENV_BIN = Path(sys.executable).parent
PLATFORM_DOCKERFILE = "infra/docker/Dockerfile"
# Where the platform image's console scripts come from: the project and its main dependencies.
PLATFORM_CLIS = {"easymlops", "dagster", "dagster-webserver", "dagster-daemon", "mlflow", "ray"}


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def compose_schema() -> dict[str, Any]:
    found = sorted((ROOT / ".tools").glob("compose-spec-*.json"))
    assert found, "the compose-spec schema is fetched by `make compose-schema` (make test does)"
    schema: dict[str, Any] = json.loads(found[-1].read_text())
    return schema


def schema_errors(document: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(document)]


def test_compose_file_validates_against_the_compose_spec_schema() -> None:
    assert schema_errors(compose()) == []


def test_the_schema_check_catches_a_broken_service() -> None:
    broken = compose()
    broken["services"]["redis"]["restart"] = ["always"]  # a string in the spec, not a list
    broken["services"]["mlflow"]["depends_on"] = {"postgres": {"condition": "is_up"}}
    errors = schema_errors(broken)
    assert any("restart" in e for e in errors), errors
    assert any("depends_on" in e for e in errors), errors


def test_compose_runs_the_whole_platform() -> None:
    assert {
        "kafka",
        "init",
        "flink-jobmanager",
        "flink-taskmanager",
        "flink-job",
        "redis",
        "postgres",
        "minio",
        "mlflow",
        "ray-head",
        "ray-worker",
        "nginx",
        "dagster-code",
        "dagster-webserver",
        "dagster-daemon",
        "otel-collector",
        "prometheus",
        "grafana",
    } <= set(services())


# ---- images ------------------------------------------------------------------------------------


def dockerfile_copies(dockerfile: Path) -> Iterator[str]:
    """Source paths of the COPY instructions that read the build context (not --from=stage)."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    for line in text.splitlines():
        words = shlex.split(line.split("#", 1)[0]) if line.strip() else []
        if not words or words[0].upper() != "COPY" or any(w.startswith("--from") for w in words):
            continue
        yield from (w for w in words[1:-1] if not w.startswith("--"))


def ignored_by_dockerignore(path: str) -> bool:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in patterns)


def built_images() -> dict[str, Path]:
    return {
        name: ROOT / service["build"]["context"] / service["build"]["dockerfile"]
        for name, service in services().items()
        if "build" in service
    }


def test_every_built_image_has_its_dockerfile_and_every_copied_path() -> None:
    dockerfiles = set(built_images().values())
    assert {ROOT / PLATFORM_DOCKERFILE, ROOT / "infra/flink/Dockerfile"} <= dockerfiles
    for dockerfile in dockerfiles:
        assert dockerfile.is_file(), dockerfile
        copied = list(dockerfile_copies(dockerfile))
        assert copied, dockerfile
        for source in copied:
            assert (ROOT / source).exists(), f"{dockerfile.name} copies missing {source}"
            assert not ignored_by_dockerignore(source), f".dockerignore drops {source}"


def test_the_platform_image_runs_as_a_user_and_has_a_healthcheck() -> None:
    instructions = [
        line.split()
        for line in (ROOT / PLATFORM_DOCKERFILE).read_text().splitlines()
        if line and not line.startswith((" ", "#"))
    ]
    users = [words[1] for words in instructions if words[0] == "USER"]
    assert users and users[-1] not in ("root", "0"), users
    assert any(words[0] == "HEALTHCHECK" for words in instructions)


# ---- commands ----------------------------------------------------------------------------------


def platform_services() -> dict[str, dict[str, Any]]:
    return {
        name: service
        for name, service in services().items()
        if service.get("build", {}).get("dockerfile") == PLATFORM_DOCKERFILE
    }


def help_argv(command: list[str]) -> list[str]:
    """The command's program and subcommands (up to its first option), asked for --help."""
    head = []
    for word in command:
        if word.startswith("-") and head[:1] != ["python"]:
            break
        head.append(word)
        if head[:2] == ["python", "-m"] and len(head) == 3:
            break
    return [*head, "--help"]


def platform_commands() -> Iterator[tuple[str, list[str]]]:
    for name, service in platform_services().items():
        yield name, service["command"]
        check = service.get("healthcheck", {}).get("test")
        if check and check[0] == "CMD" and check[1] != "python":
            yield f"{name} healthcheck", check[1:]


@pytest.mark.parametrize(("where", "command"), list(platform_commands()), ids=lambda v: str(v))
def test_every_platform_command_names_a_module_or_cli_that_exists(
    where: str, command: list[str]
) -> None:
    argv = help_argv(command)
    if argv[0] == "python":
        assert argv[1] == "-m", where
        assert find_spec(argv[2]) is not None, f"{where}: no module {argv[2]}"
        argv = [sys.executable, *argv[1:]]
    else:
        assert argv[0] in PLATFORM_CLIS, f"{where}: {argv[0]} is not a CLI of the image"
        argv = [str(VENV_BIN / argv[0]), *argv[1:]]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{where}: `{' '.join(argv)}` -> {done.stderr[-2000:]}"


def test_the_flink_job_service_submits_the_job_with_options_it_has() -> None:
    command = services()["flink-job"]["command"][-1]
    job_args = command.split("validation_job.py", 1)[1].split()
    assert "/opt/easymlops/flink_jobs/validation_job.py" in command
    flink_dockerfile = (ROOT / "infra/flink/Dockerfile").read_text()
    assert "COPY flink_jobs /opt/easymlops/flink_jobs" in flink_dockerfile
    python = ROOT / ".flink-venv/bin/python"
    assert python.exists(), "the PyFlink virtualenv comes from `make flink-venv` (make test)"
    done = subprocess.run(
        [str(python), "-m", "flink_jobs.validation_job", *job_args, "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    for option in (a for a in job_args if a.startswith("--")):
        assert option in done.stdout, option


# ---- settings, packages, secrets ---------------------------------------------------------------


def env_references(path: Path) -> set[str]:
    """EASYMLOPS_* names a mounted file reads: dagster.yaml's `env:` keys, the init script's
    ${...}."""
    return set(re.findall(r"\bEASYMLOPS_[A-Z0-9_]+", path.read_text()))


def test_every_easymlops_variable_is_a_setting_or_read_by_a_mounted_file() -> None:
    fields = {f"EASYMLOPS_{name.upper()}" for name in Settings.model_fields}
    read_by_files = env_references(DAGSTER_YAML) | env_references(POSTGRES_INIT)
    used = {
        key
        for service in services().values()
        for key in (service.get("environment") or {})
        if key.startswith("EASYMLOPS_")
    }
    assert "EASYMLOPS_KAFKA_BOOTSTRAP" in used
    assert used <= fields | read_by_files, used - fields - read_by_files


def main_dependencies() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {re.split(r"[=<>~\[;! ]", d, maxsplit=1)[0].lower() for d in project["dependencies"]}


def test_every_backend_the_platform_configures_is_in_the_image() -> None:
    instance = yaml.safe_load(DAGSTER_YAML.read_text())
    modules = {
        section.get("module") for section in instance.values() if isinstance(section, dict)
    } - {None}
    modules |= {"dagster_postgres"} if "postgres" in instance["storage"] else set()
    deps = main_dependencies()
    for module in modules:
        assert find_spec(module) is not None, module
        distribution = module.split(".")[0].replace("_", "-")
        assert distribution in deps, f"{module}: {distribution} is not a main dependency"
    mlflow_env = services()["mlflow"]["environment"]
    assert mlflow_env["MLFLOW_BACKEND_STORE_URI"].startswith("postgresql+psycopg2://")
    assert "psycopg2-binary" in deps
    assert mlflow_env["MLFLOW_ARTIFACTS_DESTINATION"].startswith("s3://")
    assert "boto3" in deps


def test_no_secret_is_written_in_deployment_files() -> None:
    text = COMPOSE_FILE.read_text()
    pattern = r"^\s*\w*(PASSWORD|SECRET\w*|ROOT_USER|API_KEY)\s*:\s*(\S+)"
    matches = list(re.finditer(pattern, text, flags=re.MULTILINE))
    assert matches
    for match in matches:
        assert match.group(2).startswith("${"), match.group(0)
    uri = services()["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    assert "${POSTGRES_PASSWORD}" in uri
    password = yaml.safe_load(DAGSTER_YAML.read_text())["storage"]["postgres"]["postgres_db"]
    assert password["password"] == {"env": "EASYMLOPS_PG_PASSWORD"}


def test_every_variable_compose_interpolates_is_documented_in_env_example() -> None:
    lines = (line.split("#", 1)[0] for line in COMPOSE_FILE.read_text().splitlines())
    used = {name for line in lines for name in re.findall(r"\$\{([A-Z0-9_]+)", line)}
    assert "POSTGRES_PASSWORD" in used
    documented = set(re.findall(r"^([A-Z0-9_]+)=", (ROOT / ".env.example").read_text(), re.M))
    assert used <= documented, used - documented
    ignored = (ROOT / ".gitignore").read_text().split()
    assert ".env" in ignored


# ---- service graph and exposure ----------------------------------------------------------------


def dependencies(service: dict[str, Any]) -> dict[str, str]:
    depends = service.get("depends_on") or {}
    if isinstance(depends, list):
        return dict.fromkeys(depends, "service_started")
    return {name: spec.get("condition", "service_started") for name, spec in depends.items()}


def test_the_service_graph_starts_in_a_working_order() -> None:
    all_services = services()
    for name, service in all_services.items():
        for needed, condition in dependencies(service).items():
            assert needed in all_services, f"{name} depends on unknown {needed}"
            target = all_services[needed]
            if condition == "service_healthy":
                assert "healthcheck" in target, f"{name} waits for {needed}'s missing healthcheck"
            if condition == "service_completed_successfully":
                assert target.get("restart") == "no", f"{needed} is a job: it must not restart"
    # No cycle: compose would refuse to start.
    done: set[str] = set()
    pending = dict(all_services)
    while pending:
        ready = [n for n, s in pending.items() if set(dependencies(s)) <= done]
        assert ready, f"dependency cycle among {sorted(pending)}"
        for name in ready:
            done.add(name)
            del pending[name]


def test_every_long_running_service_has_a_healthcheck_or_says_why_not() -> None:
    text = COMPOSE_FILE.read_text()
    for name, service in services().items():
        if service.get("restart") == "no" or "healthcheck" in service or "build" in service:
            continue  # jobs; our own images carry the Dockerfile's HEALTHCHECK
        block = re.split(r"\n  (?=\S)", text.split(f"\n  {name}:\n", 1)[1], maxsplit=1)[0]
        assert "No healthcheck" in block, f"{name}: no healthcheck and no reason given"


def test_control_planes_are_published_on_loopback_unless_opened() -> None:
    for name, service in services().items():
        for port in service.get("ports", []):
            if name == "nginx":  # the prediction API is the one public entry
                continue
            assert str(port).startswith("${EASYMLOPS_CONTROL_PLANE_HOST:-127.0.0.1}:"), (
                name,
                port,
            )


def test_volumes_keep_the_state_that_must_survive_a_restart() -> None:
    declared = set(compose()["volumes"])
    for name, path in [
        ("kafka", "/var/lib/kafka/data"),
        ("postgres", "/var/lib/postgresql"),
        ("minio", "/data"),
        ("redis", "/data"),
        ("flink-jobmanager", "/flink-data"),
        ("flink-taskmanager", "/flink-data"),
    ]:
        mounts = [str(v) for v in services()[name].get("volumes", [])]
        named = [m.split(":")[0] for m in mounts if m.split(":")[1] == path]
        assert named and named[0] in declared, (name, path, mounts)


def test_our_images_own_the_folders_their_named_volumes_mount_on() -> None:
    # A new named volume takes the owner of the image folder it is mounted on; a folder the
    # image lacks becomes root's, and our non-root processes could not write there.
    declared = set(compose()["volumes"])
    for name, dockerfile in built_images().items():
        text = re.sub(r"\\\n", " ", dockerfile.read_text())
        created = {
            path
            for line in text.splitlines()
            if "mkdir -p" in line
            for path in re.findall(r"\s(/[\w./-]+)", line.split("mkdir -p", 1)[1].split("&&")[0])
        }
        for mount in services()[name].get("volumes", []):
            source, target = str(mount).split(":")[:2]
            if source in declared:
                assert target in created, f"{name}: {dockerfile.name} does not create {target}"


def test_postgres_creates_the_database_of_each_consumer() -> None:
    created = services()["postgres"]["environment"]["EASYMLOPS_DATABASES"].split()
    env = compose()["x-platform-env"]
    mlflow_uri = services()["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]
    wanted = {
        env["EASYMLOPS_DAGSTER_PG_DB"],
        env["EASYMLOPS_PG_DBNAME"],
        mlflow_uri.rsplit("/", 1)[1],
    }
    assert wanted == set(created), (wanted, created)
    assert len(created) == len(set(created))  # Dagster and MLflow must not share a `runs` table
    assert "EASYMLOPS_DATABASES" in POSTGRES_INIT.read_text()


# ---- configuration the containers render or read ----------------------------------------------


def test_nginx_config_for_compose_listens_in_its_container_and_proxies_to_serve(
    tmp_path: Path,
) -> None:
    config = services()["nginx-config"]
    env = {
        key: value
        for key, value in config["environment"].items()
        if key.startswith("EASYMLOPS_") and "$" not in value
    }
    output = tmp_path / "nginx.conf"
    argv = [sys.executable, *config["command"][1:]]
    argv = [a if not a.startswith("--output=") else f"--output={output}" for a in argv]
    done = subprocess.run(
        argv, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    text = output.read_text()
    assert "listen 0.0.0.0:8080" in text
    assert "server ray-head:8000" in text
    assert 'access_log "/dev/stdout" easymlops_json;' in text
    # The same renderer without EASYMLOPS_BIND_HOST refuses to listen beyond loopback.
    env.pop("EASYMLOPS_BIND_HOST")
    refused = subprocess.run(
        argv, env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True, check=False
    )
    assert refused.returncode != 0
    assert "EASYMLOPS_BIND_HOST" in refused.stderr


def test_dagster_uses_the_one_instance_file_and_finds_the_code_server() -> None:
    for name in ("dagster-code", "dagster-webserver", "dagster-daemon"):
        mounts = services()[name]["volumes"]
        assert f"./{DAGSTER_YAML.relative_to(ROOT)}:/opt/dagster/dagster.yaml:ro" in mounts
    local = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    assert local["load_from"][0]["python_module"]["module_name"] == "easymlops_assets.definitions"
    remote = yaml.safe_load((ROOT / "infra/dagster/workspace.yaml").read_text())
    grpc = remote["load_from"][0]["grpc_server"]
    code = services()["dagster-code"]["command"]
    assert grpc["host"] == "dagster-code"
    assert str(grpc["port"]) == code[code.index("-p") + 1]


def test_prometheus_scrapes_services_that_exist() -> None:
    config = yaml.safe_load((ROOT / "infra/prometheus/prometheus.yml").read_text())
    names = set(services())
    for job in config["scrape_configs"]:
        for target in job["static_configs"][0]["targets"]:
            assert target.split(":")[0] in names, (job["job_name"], target)
    collector = yaml.safe_load((ROOT / "infra/otel/collector.yaml").read_text())
    exporter = collector["exporters"]["prometheus"]["endpoint"].rsplit(":", 1)[1]
    assert (
        "otel-collector:" + exporter in config["scrape_configs"][0]["static_configs"][0]["targets"]
    )
