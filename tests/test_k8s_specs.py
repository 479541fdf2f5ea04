"""The Kubernetes production path (dagster-k8s), checked WITHOUT a cluster: no Kubernetes API
server, no kubeconfig, no pods. What would be submitted is rendered with dagster-k8s's own code
and checked:

- infra/k8s/dagster-instance.yaml loads as a Dagster instance config and its run launcher config
  passes K8sRunLauncher's own schema; the run worker Job it would create (built the way
  `K8sRunLauncher._launch_k8s_job_with_args` builds it) carries the image, env sources and
  resources;
- the Flink submission pod (easymlops/k8s.py) is a valid V1PodSpec whose env comes only from
  ConfigMap/Secret references, whose arguments the job itself accepts, and whose submit script
  does what it says (run against a fake `flink` executable);
- the asset (easymlops_assets/k8s.py) really calls `PipesK8sClient.run`: only the boundary to
  Kubernetes is replaced (kubernetes.config.load_incluster_config and the CoreV1Api methods the
  client calls), and the V1Pod it would create is captured and inspected.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import dagster as dg
import kubernetes
import pytest
import yaml
from dagster._config import process_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.instance.ref import InstanceRef
from dagster._core.storage.dagster_run import DagsterRun
from dagster_k8s import K8sRunLauncher, PipesK8sClient
from dagster_k8s.container_context import K8sContainerContext
from dagster_k8s.job import construct_dagster_k8s_job
from dagster_k8s.models import k8s_model_from_dict, k8s_snake_case_dict
from dagster_postgres import DagsterPostgresStorage
from kubernetes.client import models as k8s

from easymlops import k8s as ek8s
from easymlops_assets.k8s import PIPES_K8S_CLIENT, flink_validation_k8s_asset

ROOT = Path(__file__).resolve().parent.parent
INSTANCE_YAML = ROOT / "infra" / "k8s" / "dagster-instance.yaml"
PG_ENV = {
    "DAGSTER_PG_HOST": "pg.example",
    "DAGSTER_PG_USER": "dagster",
    "DAGSTER_PG_PASSWORD": "not-a-real-password",
    "DAGSTER_PG_DB": "dagster",
}


def _instance_config() -> dict[str, Any]:
    return yaml.safe_load(INSTANCE_YAML.read_text())


def _quantity(value: str) -> float:
    """A Kubernetes quantity as a number (cores, bytes); enough for 500m, 2, 1Gi."""
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    for suffix, factor in units.items():
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * factor
    return float(value)


def _assert_requests_within_limits(resources: Any) -> None:
    get = (lambda r, k: r[k]) if isinstance(resources, dict) else getattr
    limits, requests = get(resources, "limits"), get(resources, "requests")
    assert limits and set(limits) >= {"cpu", "memory"}
    assert requests and set(requests) >= {"cpu", "memory"}
    for key in ("cpu", "memory"):
        assert _quantity(str(requests[key])) <= _quantity(str(limits[key])), key


# ---- the Dagster instance -------------------------------------------------------------------
def test_instance_yaml_loads_through_dagsters_schema(tmp_path: Path) -> None:
    shutil.copy(INSTANCE_YAML, tmp_path / "dagster.yaml")
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert config["run_launcher"]["module"] == "dagster_k8s"
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["run_coordinator"]["class"] == "QueuedRunCoordinator"
    assert set(config["storage"]) == {"postgres"}


def test_postgres_storage_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    postgres = _instance_config()["storage"]["postgres"]
    # Every connection value but the port is an `env:` reference: no host, user or password here.
    for key, value in postgres["postgres_db"].items():
        if key != "port":
            assert isinstance(value, dict) and set(value) == {"env"}, key
    for name in PG_ENV:
        monkeypatch.delenv(name, raising=False)
    assert not process_config(DagsterPostgresStorage.config_type(), postgres).success
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    resolved = process_config(DagsterPostgresStorage.config_type(), postgres)
    assert resolved.success, resolved.errors
    assert resolved.value["postgres_db"]["password"] == PG_ENV["DAGSTER_PG_PASSWORD"]


def test_run_launcher_config_passes_k8s_run_launcher_schema() -> None:
    launcher = _instance_config()["run_launcher"]["config"]
    result = process_config(K8sRunLauncher.config_type(), launcher)
    assert result.success, result.errors
    value = result.value
    assert value["load_incluster_config"] is True
    assert value["job_namespace"] == "easymlops"
    assert value["job_image"] == "easymlops/platform:latest"
    assert value["env_config_maps"] == [ek8s.CONFIG_MAP]
    assert value["env_secrets"] == [ek8s.SECRET]
    assert value["instance_config_map"] and value["service_account_name"]
    _assert_requests_within_limits(value["resources"])


def test_run_worker_job_rendered_by_the_launcher(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The instance's launcher, rehydrated from the yaml (the kube config loading is the only
    thing replaced), renders the run worker Job with the pieces the yaml names."""
    loaded: list[dict[str, Any]] = []
    monkeypatch.setattr(
        "dagster_k8s.launcher.load_kubernetes_config", lambda **kwargs: loaded.append(kwargs)
    )
    shutil.copy(INSTANCE_YAML, tmp_path / "dagster.yaml")
    ref = InstanceRef.from_dir(str(tmp_path))
    launcher = ref.run_launcher_data.rehydrate(K8sRunLauncher)  # type: ignore[union-attr]
    assert loaded and loaded[0]["load_incluster_config"] is True

    run = DagsterRun(job_name="__ASSET_JOB", run_id="0123456789abcdef")
    context = K8sContainerContext.create_for_run(run, launcher, include_run_tags=True)
    job = construct_dagster_k8s_job(
        job_config=context.get_k8s_job_config(job_image=None, run_launcher=launcher),
        args=["dagster", "api", "execute_run", "{}"],
        job_name="dagster-run-0123456789abcdef",
        pod_name="dagster-run-0123456789abcdef",
        component="run_worker",
        user_defined_k8s_config=context.run_k8s_config,
    )
    assert isinstance(job, k8s.V1Job)
    assert context.namespace == "easymlops"
    pod = job.spec.template.spec
    assert pod.service_account_name == "dagster"
    [container] = pod.containers
    assert container.image == "easymlops/platform:latest"
    sources = {
        (
            s.config_map_ref.name if s.config_map_ref else None,
            s.secret_ref.name if s.secret_ref else None,
        )
        for s in container.env_from
    }
    assert (ek8s.CONFIG_MAP, None) in sources
    assert (None, ek8s.SECRET) in sources
    # The postgres password arrives as a secret reference, never as a value.
    password = next(e for e in container.env if e.name == "DAGSTER_PG_PASSWORD")
    assert password.value is None
    assert password.value_from.secret_key_ref.name == "dagster-postgresql-secret"
    _assert_requests_within_limits(container.resources)
    # The run pod gets the instance as a serialized InstanceRef in its arguments: it keeps the
    # `env:` references, so no resolved password travels in a Job spec.
    for name, value in PG_ENV.items():
        monkeypatch.setenv(name, value)
    storage_yaml = InstanceRef.from_dir(str(tmp_path)).storage_data.config_yaml  # type: ignore[union-attr]
    assert "env: DAGSTER_PG_PASSWORD" in storage_yaml
    assert PG_ENV["DAGSTER_PG_PASSWORD"] not in storage_yaml


# ---- the Flink submission pod ----------------------------------------------------------------
def test_flink_pod_spec_is_a_valid_v1podspec() -> None:
    sub = ek8s.FlinkSubmission()
    spec = k8s_model_from_dict(
        k8s.V1PodSpec, k8s_snake_case_dict(k8s.V1PodSpec, ek8s.base_pod_spec(sub))
    )
    meta = k8s_model_from_dict(
        k8s.V1ObjectMeta, k8s_snake_case_dict(k8s.V1ObjectMeta, ek8s.base_pod_meta(sub))
    )
    assert meta.labels["app.kubernetes.io/component"] == "flink-validation-submit"
    assert spec.restart_policy == "Never"
    assert spec.automount_service_account_token is False
    assert spec.active_deadline_seconds and spec.active_deadline_seconds > 0
    assert spec.security_context.run_as_non_root is True
    [container] = spec.containers
    assert container.image == sub.image
    # No command: the image's entrypoint (which drops root) runs the args.
    assert container.command is None
    assert container.args[:2] == ["bash", "-c"]
    assert container.args[4:6] == [sub.jobmanager_host, str(sub.jobmanager_port)]
    assert container.args[6:] == ek8s.flink_run_args(sub)
    _assert_requests_within_limits(container.resources)


def test_flink_pod_env_is_only_configmap_and_secret_references() -> None:
    sub = ek8s.FlinkSubmission(config_map="cm", secret="sec")
    [container] = ek8s.base_pod_spec(sub)["containers"]
    env = [
        k8s_model_from_dict(k8s.V1EnvVar, k8s_snake_case_dict(k8s.V1EnvVar, e))
        for e in container["env"]
    ]
    assert all(e.value is None and e.value_from is not None for e in env)
    by_name = {e.name: e.value_from for e in env}
    # The driver reads these to build the job graph; the Redis URL may hold a password.
    redis = by_name["EASYMLOPS_REDIS_URL"].secret_key_ref
    assert (redis.name, redis.key, redis.optional) == ("sec", "EASYMLOPS_REDIS_URL", False)
    kafka = by_name["EASYMLOPS_KAFKA_BOOTSTRAP"].config_map_key_ref
    assert (kafka.name, kafka.key, kafka.optional) == ("cm", "EASYMLOPS_KAFKA_BOOTSTRAP", False)
    for topic in ("RAW", "VALIDATED", "INVALID"):
        ref = by_name[f"EASYMLOPS_TOPIC_{topic}"].config_map_key_ref
        assert ref.name == "cm" and ref.optional is True


def test_flink_pod_env_names_are_real_settings() -> None:
    from easymlops.settings import Settings

    fields = {f"EASYMLOPS_{name.upper()}" for name in Settings.model_fields}
    assert {name for name, _, _ in ek8s.SUBMIT_ENV} <= fields


def test_flink_pod_runs_what_the_image_holds() -> None:
    """The job file and name the pod relies on are those of the repository and the image."""
    dockerfile = (ROOT / "infra" / "flink" / "Dockerfile").read_text()
    assert "COPY flink_jobs /opt/easymlops/flink_jobs" in dockerfile
    assert ek8s.JOB_FILE == "/opt/easymlops/flink_jobs/validation_job.py"
    job = (ROOT / "flink_jobs" / "validation_job.py").read_text()
    assert re.search(rf'env\.execute\("{re.escape(ek8s.JOB_NAME)}"\)', job)
    assert "FROM flink:" in dockerfile  # /opt/flink/bin/flink is the official image's CLI


def test_flink_run_args_parse_with_the_jobs_own_parser() -> None:
    flink_python = ROOT / ".flink-venv" / "bin" / "python"
    if not flink_python.exists():
        pytest.skip("no .flink-venv (`make flink-venv`): the job's parser needs pyflink")
    sub = ek8s.FlinkSubmission(
        checkpoint_dir="s3://checkpoints/validator", group_id="g", transactional_id_prefix="t"
    )
    args = ek8s.flink_run_args(sub)
    job_args = args[args.index("--python") + 2 :]
    code = (
        "import json, sys; from flink_jobs.validation_job import parse_args; "
        "print(json.dumps(vars(parse_args(sys.argv[1:]))))"
    )
    done = subprocess.run(
        [str(flink_python), "-c", code, *job_args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert done.returncode == 0, done.stderr
    parsed = yaml.safe_load(done.stdout.strip().splitlines()[-1])
    assert parsed["mode"] == "kafka"
    assert parsed["checkpoint_dir"] == "s3://checkpoints/validator"
    assert parsed["group_id"] == "g" and parsed["transactional_id_prefix"] == "t"
    assert parsed["checkpoint_interval_ms"] == sub.checkpoint_interval_ms


def _run_submit_script(tmp_path: Path, running: str) -> tuple[int, list[list[str]], str]:
    """Run the pod's script with a fake `flink` that logs its argv and answers `list`."""
    log = tmp_path / "argv.log"
    fake = tmp_path / "flink"
    fake.write_text(
        "#!/bin/bash\n"
        f'printf "%s\\x1f" "$@" >> {log}; echo >> {log}\n'
        f'if [ "$1" = list ]; then printf "%s\\n" "{running}"; fi\n'
    )
    fake.chmod(0o755)
    args = ek8s.container_args(ek8s.FlinkSubmission())
    assert args[2].count(ek8s.FLINK_BIN) == 2
    script = args[2].replace(ek8s.FLINK_BIN, str(fake))
    done = subprocess.run(
        ["bash", "-c", script, *args[3:]], capture_output=True, text=True, timeout=30
    )
    calls = [line.split("\x1f")[:-1] for line in log.read_text().splitlines()]
    return done.returncode, calls, done.stdout


def test_submit_script_submits_when_not_running(tmp_path: Path) -> None:
    sub = ek8s.FlinkSubmission()
    code, calls, _ = _run_submit_script(tmp_path, "No running jobs.")
    assert code == 0
    target = ["--target", "remote", "-Drest.address=flink-jobmanager", "-Drest.port=8081"]
    assert calls == [
        ["list", "--running", *target],
        ["run", *target, "--detached", *ek8s.flink_run_args(sub)],
    ]


def test_submit_script_does_not_submit_a_second_copy(tmp_path: Path) -> None:
    line = f"01.01.2026 00:00:00 : {'a' * 32} : {ek8s.JOB_NAME} (RUNNING)"
    code, calls, out = _run_submit_script(tmp_path, line)
    assert code == 0
    assert [c[0] for c in calls] == ["list"]
    assert "already running" in out


# ---- PipesK8sClient.run, with the Kubernetes API replaced ------------------------------------
class _FakeCoreV1:
    """Stands in for kubernetes.client.CoreV1Api: records the pod, reports it terminated."""

    def __init__(self, exit_code: int) -> None:
        self.exit_code = exit_code
        self.created: list[tuple[str, k8s.V1Pod]] = []
        self.deleted: list[tuple[str, str]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        api = kubernetes.client.CoreV1Api
        monkeypatch.setattr(api, "create_namespaced_pod", lambda _, ns, body: self.create(ns, body))
        monkeypatch.setattr(api, "list_namespaced_pod", lambda _, **kw: self.list(**kw))
        monkeypatch.setattr(api, "read_namespaced_pod_log", lambda _, *a, **kw: self.logs(**kw))
        monkeypatch.setattr(
            api, "delete_namespaced_pod", lambda _, name, ns: self.deleted.append((name, ns))
        )
        monkeypatch.setattr(kubernetes.config, "load_incluster_config", lambda: None)

    def create(self, namespace: str, body: k8s.V1Pod) -> k8s.V1Pod:
        self.created.append((namespace, body))
        return body

    def list(self, **_: Any) -> k8s.V1PodList:
        _, pod = self.created[-1]
        terminated = k8s.V1ContainerStateTerminated(exit_code=self.exit_code, message="done")
        status = k8s.V1ContainerStatus(
            name=pod.spec.containers[0].name,
            image=pod.spec.containers[0].image,
            image_id="",
            ready=False,
            restart_count=0,
            state=k8s.V1ContainerState(terminated=terminated),
        )
        pod.status = k8s.V1PodStatus(container_statuses=[status])
        return k8s.V1PodList(items=[pod])

    def logs(self, **kwargs: Any) -> _LogResponse:
        if kwargs.get("follow"):  # the Pipes log reader's stream, with timestamps
            line = "Job has been submitted with JobID " + "b" * 32
            return _LogResponse(f"2026-01-01T00:00:00.000000Z {line}\n".encode())
        return _LogResponse(b"flink: connection refused\n")  # the tail, on failure


class _LogResponse:
    """What `read_namespaced_pod_log(..., _preload_content=False)` returns: a urllib3 response,
    iterated (log stream) or read whole (`.data`)."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Any:
        return iter([self.data])


def _materialize(monkeypatch: pytest.MonkeyPatch, exit_code: int, sub: ek8s.FlinkSubmission):
    fake = _FakeCoreV1(exit_code)
    fake.install(monkeypatch)
    asset = flink_validation_k8s_asset(sub, deps=())
    result = dg.materialize(
        [asset],
        resources={
            PIPES_K8S_CLIENT: PipesK8sClient(load_incluster_config=True, poll_interval=0.01)
        },
        raise_on_error=False,
    )
    return fake, result


def test_asset_submits_the_rendered_pod_through_pipes(monkeypatch: pytest.MonkeyPatch) -> None:
    sub = ek8s.FlinkSubmission(image="registry.example/easymlops-flink:2.2.1", namespace="ns")
    fake, result = _materialize(monkeypatch, 0, sub)
    assert result.success
    [(namespace, pod)] = fake.created
    assert namespace == "ns"
    assert fake.deleted == [(pod.metadata.name, "ns")]
    assert pod.metadata.labels["app.kubernetes.io/component"] == "flink-validation-submit"
    assert pod.spec.restart_policy == "Never"
    [container] = pod.spec.containers
    assert container.image == sub.image
    assert container.command is None
    assert container.args == ek8s.container_args(sub)
    # Pipes adds its bootstrap variables as values; everything else is a reference.
    literals = {e.name for e in container.env if e.value is not None}
    assert literals and all(name.startswith("DAGSTER_PIPES_") for name in literals)
    refs = {e.name for e in container.env if e.value_from is not None}
    assert refs == {name for name, _, _ in ek8s.SUBMIT_ENV}
    _assert_requests_within_limits(container.resources)
    [materialization] = result.asset_materializations_for_node("flink_validation_k8s")
    assert materialization.metadata["jobmanager"].value == "flink-jobmanager:8081"


def test_asset_fails_when_the_submission_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    fake, result = _materialize(monkeypatch, 1, ek8s.FlinkSubmission())
    assert not result.success
    assert len(fake.created) == 1 and len(fake.deleted) == 1
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "connection refused" in str(failure.step_failure_data.error)


def test_the_code_location_adds_the_flink_asset_only_in_kubernetes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from easymlops.settings import get_settings
    from easymlops_assets.definitions import defs

    key = dg.AssetKey("flink_validation_k8s")
    for switch, expected in (("0", False), ("1", True)):
        monkeypatch.setenv("EASYMLOPS_KUBERNETES", switch)
        get_settings.cache_clear()
        try:
            loaded = defs()
        finally:
            get_settings.cache_clear()
        keys = {
            k for a in loaded.assets or [] if isinstance(a, dg.AssetsDefinition) for k in a.keys
        }
        assert (key in keys) == expected
        assert (PIPES_K8S_CLIENT in (loaded.resources or {})) == expected
