"""infra/k8s/, validated offline (no cluster, no network at test time):

- built-in kinds against Kubernetes' own JSON schemas, strict (unknown fields fail), as bundled
  by the kubernetes-validate dev dependency;
- custom resources (RayService, FlinkDeployment, Kafka, KafkaNodePool, KafkaTopic) against the
  openAPIV3Schema of each operator's own CRD, derived by `make k8s-schemas` into
  .tools/k8s-schemas/ (see the Makefile), made strict the same way;
- the generated files (easymlops/k8s_manifests.py) equal what the generator writes now, so the
  RayService's serveConfigV2, the KafkaTopics and the FlinkDeployment's job arguments cannot drift
  from the settings, serving/deploy.py and easymlops/k8s.py;
- Dagster's Helm values against dagster-k8s's K8sRunLauncher schema and against
  dagster-instance.yaml;
- secrets only by reference, non-root pods, control planes closed by NetworkPolicies.
Each check has a negative twin that plants the fault and sees it caught.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from dagster._config import process_config
from dagster_k8s import K8sRunLauncher
from ray.serve.schema import ServeDeploySchema

from easymlops import k8s as ek8s
from easymlops import k8s_manifests as km

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "infra" / "k8s"
SCHEMAS = ROOT / ".tools" / "k8s-schemas"
# The oldest Kubernetes minor these manifests are written for.
K8S_VERSION = "1.33"
# Files under infra/k8s/ that are not Kubernetes objects.
NOT_OBJECTS = {"dagster-values.yaml", "dagster-instance.yaml"}
CUSTOM_GROUPS = ("ray.io/", "flink.apache.org/", "kafka.strimzi.io/")


def _docs(name: str | None = None) -> list[dict[str, Any]]:
    paths = [K8S / name] if name else sorted(K8S.glob("*.yaml"))
    return [
        doc
        for path in paths
        if path.name not in NOT_OBJECTS
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def _one(kind: str, name: str | None = None) -> dict[str, Any]:
    found = [
        d for d in _docs() if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
    ]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


# ---- schemas ---------------------------------------------------------------------------------
def _strict(schema: Any) -> Any:
    """An object schema with `properties` admits nothing else (what the API server's pruning
    would silently drop is an error here), unless the CRD keeps unknown fields on purpose."""
    if isinstance(schema, dict):
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        for value in schema.values():
            _strict(value)
    elif isinstance(schema, list):
        for value in schema:
            _strict(value)
    return schema


def _crd_schema(doc: dict[str, Any]) -> dict[str, Any]:
    group, version = doc["apiVersion"].split("/")
    path = SCHEMAS / f"{group}_{version}_{doc['kind']}.json".lower()
    assert SCHEMAS.is_dir(), "the CRD schemas come from `make k8s-schemas` (make test runs it)"
    assert path.exists(), f"no CRD schema for {doc['apiVersion']} {doc['kind']} in {SCHEMAS}"
    schema = json.loads(path.read_text())
    # apiVersion, kind and metadata are the API server's, whatever the CRD's root lists.
    schema.setdefault("properties", {})
    schema["properties"].setdefault("apiVersion", {"type": "string"})
    schema["properties"].setdefault("kind", {"type": "string"})
    schema["properties"].setdefault("metadata", {"type": "object"})
    return _strict(schema)


def crd_errors(doc: dict[str, Any]) -> list[tuple[str, str]]:
    validator = jsonschema.Draft4Validator(_crd_schema(doc))
    return [("/".join(map(str, e.absolute_path)), e.message) for e in validator.iter_errors(doc)]


def builtin_errors(doc: dict[str, Any]) -> list[str]:
    try:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [str(exc)]
    return []


def _is_custom(doc: dict[str, Any]) -> bool:
    return doc["apiVersion"].startswith(CUSTOM_GROUPS)


# ---- generated files -------------------------------------------------------------------------
def test_generated_files_equal_the_generator() -> None:
    for name, text in km.generated().items():
        path = K8S / name
        assert path.exists(), f"{name}: run python -m easymlops.k8s_manifests"
        assert path.read_text() == text, f"{name} is stale: run python -m easymlops.k8s_manifests"
    assert km.main(["--check"]) == 0


def test_check_fails_on_a_hand_edited_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, text in km.generated().items():
        (tmp_path / name).write_text(text)
    monkeypatch.setattr(km, "K8S_DIR", tmp_path)
    assert km.main(["--check"]) == 0
    edited = tmp_path / "kafka.yaml"
    edited.write_text(edited.read_text().replace("partitions: 6", "partitions: 7"))
    assert km.main(["--check"]) == 1


# ---- built-in kinds: Kubernetes' own schemas -------------------------------------------------
def test_every_object_is_validated_by_some_schema() -> None:
    kinds = {(d["apiVersion"], d["kind"]) for d in _docs()}
    custom = {k for k in kinds if k[0].startswith(CUSTOM_GROUPS)}
    assert custom == {
        ("ray.io/v1", "RayService"),
        ("flink.apache.org/v1beta1", "FlinkDeployment"),
        ("kafka.strimzi.io/v1beta2", "Kafka"),
        ("kafka.strimzi.io/v1beta2", "KafkaNodePool"),
        ("kafka.strimzi.io/v1beta2", "KafkaTopic"),
    }
    for doc in _docs():
        if not _is_custom(doc):
            # A kind kubernetes-validate has no schema for raises, not passes.
            builtin_errors(doc)


@pytest.mark.parametrize(
    "doc",
    [d for d in _docs() if not _is_custom(d)],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_builtin_kinds_pass_kubernetes_schemas(doc: dict[str, Any]) -> None:
    assert builtin_errors(doc) == []


def test_builtin_validation_rejects_planted_faults() -> None:
    mlflow = _one("Deployment", "mlflow")
    typo = copy.deepcopy(mlflow)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePulPolicy"] = "Always"
    assert builtin_errors(typo)
    wrong_type = copy.deepcopy(mlflow)
    wrong_type["spec"]["replicas"] = "one"
    assert builtin_errors(wrong_type)
    policy = copy.deepcopy(_one("NetworkPolicy", "default-deny-ingress"))
    policy["spec"]["policyTypes"] = "Ingress"
    assert builtin_errors(policy)


# ---- custom resources: the operators' CRDs ---------------------------------------------------
@pytest.mark.parametrize(
    "doc",
    [d for d in _docs() if _is_custom(d) and d["kind"] != "FlinkDeployment"],
    ids=lambda d: f"{d['kind']}/{d['metadata']['name']}",
)
def test_custom_resources_pass_their_operators_crd(doc: dict[str, Any]) -> None:
    assert crd_errors(doc) == []


def test_flinkdeployment_passes_the_crd_but_for_flink_2() -> None:
    """The newest Flink operator CRD on the reachable Maven registry (1.10.0) enumerates
    flinkVersion v1_13..v1_20; the job's image is Flink 2.2, which needs an operator whose CRD
    has v2_2. Everything else must pass 1.10's schema; flinkVersion is the one known error."""
    doc = _one("FlinkDeployment")
    errors = crd_errors(doc)
    assert [path for path, _ in errors] == ["spec/flinkVersion"], errors
    assert "v1_20" in errors[0][1]
    on_1_20 = copy.deepcopy(doc)
    on_1_20["spec"]["flinkVersion"] = "v1_20"
    assert crd_errors(on_1_20) == []


def test_flink_version_matches_the_image() -> None:
    dockerfile = (ROOT / "infra" / "flink" / "Dockerfile").read_text()
    version = re.search(r"^ARG FLINK_VERSION=(\d+)\.(\d+)\.(\d+)$", dockerfile, re.M)
    assert version
    major, minor, patch = version.groups()
    spec = _one("FlinkDeployment")["spec"]
    assert spec["flinkVersion"] == f"v{major}_{minor}"
    assert (
        spec["job"]["jarURI"] == f"local:///opt/flink/opt/flink-python-{major}.{minor}.{patch}.jar"
    )
    env = spec["podTemplate"]["spec"]["containers"][0]["env"]
    plugins = next(e["value"] for e in env if e["name"] == "ENABLE_BUILT_IN_PLUGINS")
    assert plugins == f"flink-s3-fs-hadoop-{major}.{minor}.{patch}.jar"


def test_crd_validation_rejects_planted_faults() -> None:
    ray = copy.deepcopy(_one("RayService"))
    ray["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParms"] = {}
    assert any("rayStartParms" in m for _, m in crd_errors(ray))
    flink = copy.deepcopy(_one("FlinkDeployment"))
    flink["spec"]["flinkVersion"] = "v9_9"
    flink["spec"]["job"]["upgradeMode"] = "sometimes"
    paths = {p for p, _ in crd_errors(flink)}
    assert {"spec/flinkVersion", "spec/job/upgradeMode"} <= paths
    topic = copy.deepcopy(_one("KafkaTopic", "events-raw"))
    topic["spec"]["partitions"] = "six"
    assert [p for p, _ in crd_errors(topic)] == ["spec/partitions"]
    pool = copy.deepcopy(_one("KafkaNodePool"))
    pool["spec"]["roles"] = ["leader"]
    assert crd_errors(pool)


# ---- what the generated resources say --------------------------------------------------------
def test_serve_config_is_serve_schema_valid_and_from_the_settings() -> None:
    from serving.app import DEPLOYMENT_NAME
    from serving.deploy import APP_NAME

    settings = km.k8s_settings()
    raw = _one("RayService")["spec"]["serveConfigV2"]
    config = yaml.safe_load(raw)
    assert config == km.serve_config(settings)
    parsed = ServeDeploySchema.model_validate(config)
    assert parsed.http_options.port == settings.serve_port
    assert parsed.http_options.request_timeout_s == settings.serve_request_timeout_s
    [app] = parsed.applications
    assert (app.name, app.route_prefix) == (APP_NAME, "/")
    [deployment] = app.deployments
    assert deployment.name == DEPLOYMENT_NAME
    assert deployment.num_replicas == settings.serve_replicas
    assert deployment.ray_actor_options.num_cpus == settings.serve_num_cpus
    assert deployment.max_ongoing_requests == settings.serve_max_ongoing_requests
    assert deployment.max_queued_requests == settings.serve_max_queued_requests
    assert deployment.backpressure_config.status_code == 503
    assert deployment.backpressure_config.retry_after_s == settings.serve_retry_after_s
    # The import path names the builder, and the builder builds a Serve app.
    module, attr = app.import_path.split(":")
    assert (module, attr) == ("easymlops.k8s_manifests", "serve_app")
    from ray.serve.deployment import Application

    assert isinstance(km.serve_app({}), Application)


def test_serve_port_is_the_ray_pods_port() -> None:
    spec = _one("RayService")["spec"]["rayClusterConfig"]
    port = km.k8s_settings().serve_port
    for template in [spec["headGroupSpec"]["template"]] + [
        g["template"] for g in spec["workerGroupSpecs"]
    ]:
        [container] = template["spec"]["containers"]
        assert {"name": "serve", "containerPort": port} in container["ports"]
        assert container["image"] == km.PLATFORM_IMAGE


def test_ray_version_is_the_locked_ray() -> None:
    lock = (ROOT / "uv.lock").read_text()
    locked = re.search(r'\[\[package\]\]\nname = "ray"\nversion = "([^"]+)"', lock)
    assert locked and _one("RayService")["spec"]["rayClusterConfig"]["rayVersion"] == locked[1]


def test_kafka_topics_are_the_settings_topics() -> None:
    settings = km.k8s_settings()
    topics = [d for d in _docs() if d["kind"] == "KafkaTopic"]
    assert [t["spec"]["topicName"] for t in topics] == settings.topics
    assert {t["spec"]["partitions"] for t in topics} == {settings.topic_partitions}
    for topic in topics:
        assert topic["metadata"]["labels"]["strimzi.io/cluster"] == km.KAFKA_CLUSTER
    assert _one("KafkaNodePool")["metadata"]["labels"]["strimzi.io/cluster"] == km.KAFKA_CLUSTER
    # Strimzi's bootstrap Service for the cluster and its plain listener.
    [listener] = _one("Kafka")["spec"]["kafka"]["listeners"]
    bootstrap = f"{km.KAFKA_CLUSTER}-kafka-bootstrap:{listener['port']}"
    assert settings.bootstrap_servers == bootstrap


def test_config_map_is_settings_parse_and_holds_no_secret() -> None:
    from easymlops.settings import Settings

    data = _one("ConfigMap", ek8s.CONFIG_MAP)["data"]
    fields = {f"EASYMLOPS_{n.upper()}" for n in Settings.model_fields}
    assert {k for k in data if k.startswith("EASYMLOPS_")} <= fields
    assert not [k for k in data if _secret_name(k)]
    assert km.k8s_settings().kubernetes is True


def test_flink_job_runs_what_the_pipes_submission_runs() -> None:
    spec = _one("FlinkDeployment")["spec"]
    assert spec["job"]["args"] == ek8s.flink_run_args(ek8s.FlinkSubmission())
    assert spec["job"]["entryClass"] == "org.apache.flink.client.python.PythonDriver"
    assert spec["image"] == km.FLINK_IMAGE
    # The Service the Pipes asset checks selects this deployment's JobManager.
    service = _one("Service", "flink-jobmanager")
    assert service["spec"]["selector"] == {
        "app": _one("FlinkDeployment")["metadata"]["name"],
        "component": "jobmanager",
    }
    assert service["spec"]["ports"][0]["port"] == ek8s.FlinkSubmission().jobmanager_port


# ---- secrets by reference, non-root ----------------------------------------------------------
_SECRET_WORDS = ("PASSWORD", "SECRET", "TOKEN", "API_KEY", "ACCESS_KEY", "REDIS_URL", "STORE_URI")


def _secret_name(name: str) -> bool:
    return any(word in name.upper() for word in _SECRET_WORDS)


def secret_violations(doc: Any, path: str = "") -> list[str]:
    """Inline secrets anywhere in a manifest: a Secret object, or an env entry with a secret-like
    name and a literal value."""
    found: list[str] = []
    if isinstance(doc, dict):
        if doc.get("kind") == "Secret":
            found.append(f"{path}: a Secret object (create Secrets out of band)")
        if "name" in doc and "value" in doc and _secret_name(str(doc["name"])):
            found.append(f"{path}: {doc['name']} has a literal value")
        for key, value in doc.items():
            found += secret_violations(value, f"{path}/{key}")
    elif isinstance(doc, list):
        for i, value in enumerate(doc):
            found += secret_violations(value, f"{path}/{i}")
    return found


def _all_yaml() -> list[tuple[str, Any]]:
    return [
        (p.name, d)
        for p in sorted(K8S.glob("*.yaml"))
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]


def test_no_secret_values_anywhere() -> None:
    for name, doc in _all_yaml():
        assert secret_violations(doc, name) == []
    values = yaml.safe_load((K8S / "dagster-values.yaml").read_text())
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in values["postgresql"]


def test_secret_check_catches_an_inline_value() -> None:
    doc = copy.deepcopy(_one("Deployment", "mlflow"))
    doc["spec"]["template"]["spec"]["containers"][0]["env"].append(
        {"name": "EASYMLOPS_PG_PASSWORD", "value": "hunter2"}
    )
    assert secret_violations(doc)
    assert secret_violations({"apiVersion": "v1", "kind": "Secret", "stringData": {"a": "b"}})


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    kind = doc["kind"]
    if kind in ("Deployment", "StatefulSet"):
        return [spec["template"]["spec"]]
    if kind == "RayService":
        cluster = spec["rayClusterConfig"]
        return [cluster["headGroupSpec"]["template"]["spec"]] + [
            g["template"]["spec"] for g in cluster["workerGroupSpecs"]
        ]
    if kind == "FlinkDeployment":
        return [spec["podTemplate"]["spec"]]
    return []


def root_violations(pod: dict[str, Any]) -> list[str]:
    found = []
    context = pod.get("securityContext", {})
    if context.get("runAsNonRoot") is not True or not context.get("runAsUser"):
        found.append("pod securityContext: runAsNonRoot with a non-zero runAsUser")
    for container in pod.get("containers", []):
        if container.get("securityContext", {}).get("allowPrivilegeEscalation") is not False:
            found.append(f"{container['name']}: allowPrivilegeEscalation must be false")
    return found


def test_every_pod_runs_as_non_root() -> None:
    pods = [(d["kind"], p) for d in _docs() for p in pod_specs(d)]
    assert {k for k, _ in pods} == {"Deployment", "StatefulSet", "RayService", "FlinkDeployment"}
    for kind, pod in pods:
        assert root_violations(pod) == [], kind
    values = yaml.safe_load((K8S / "dagster-values.yaml").read_text())
    [code] = values["dagster-user-deployments"]["deployments"]
    for part in (code, values["dagsterWebserver"], values["dagsterDaemon"]):
        pod = {"securityContext": part["podSecurityContext"]}
        pod["containers"] = [{"name": "c", "securityContext": part["securityContext"]}]
        assert root_violations(pod) == []


def test_root_check_catches_a_root_pod() -> None:
    pod = copy.deepcopy(pod_specs(_one("StatefulSet", "redis"))[0])
    pod["securityContext"]["runAsNonRoot"] = False
    assert root_violations(pod)
    pod = copy.deepcopy(pod_specs(_one("RayService"))[0])
    del pod["containers"][0]["securityContext"]
    assert root_violations(pod)


# ---- network policies ------------------------------------------------------------------------
SERVE_PORT = 8000


def open_ports(policies: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Ingress rules that admit peers from outside the namespace, other than the serving port
    on the serving pods and the operators' namespaces."""
    operators = {"kuberay-operator", "flink-operator", "strimzi"}
    found = []
    for policy in policies:
        spec = policy["spec"]
        for rule in spec.get("ingress", []):
            peers = rule.get("from")
            ports = [p.get("port") for p in rule.get("ports", [])] or ["all"]
            if not peers:
                if spec["podSelector"] != {"matchLabels": {"ray.io/serve": "true"}} or ports != [
                    SERVE_PORT
                ]:
                    found.append((policy["metadata"]["name"], ports))
                continue
            for peer in peers:
                if "ipBlock" in peer:
                    found.append((policy["metadata"]["name"], ports))
                elif "namespaceSelector" in peer:
                    labels = peer["namespaceSelector"].get("matchLabels", {})
                    if labels.get("kubernetes.io/metadata.name") not in operators or ports == [
                        "all"
                    ]:
                        found.append((policy["metadata"]["name"], ports))
    return found


def test_only_the_serving_port_is_open() -> None:
    policies = [d for d in _docs() if d["kind"] == "NetworkPolicy"]
    deny = _one("NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    assert open_ports(policies) == []
    assert km.k8s_settings().serve_port == SERVE_PORT
    # No Service reaches beyond the cluster by itself.
    for doc in _docs():
        if doc["kind"] == "Service":
            assert doc["spec"].get("type", "ClusterIP") in ("ClusterIP", "ExternalName")


def test_policy_check_catches_an_open_dashboard() -> None:
    policies = [d for d in _docs() if d["kind"] == "NetworkPolicy"]
    dashboard = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "open-dashboard", "namespace": km.NAMESPACE},
        "spec": {
            "podSelector": {"matchLabels": {"ray.io/node-type": "head"}},
            "ingress": [{"ports": [{"port": 8265}]}],
        },
    }
    assert builtin_errors(dashboard) == []
    assert open_ports([*policies, dashboard]) == [("open-dashboard", [8265])]
    anywhere = copy.deepcopy(dashboard)
    anywhere["spec"]["ingress"] = [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}]
    assert open_ports([anywhere])


# ---- Dagster: the Helm values against dagster-k8s and dagster-instance.yaml ------------------
def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def launcher_config_from_values(values: dict[str, Any]) -> dict[str, Any]:
    """The K8sRunLauncher config the chart renders from runLauncher.config.k8sRunLauncher: keys
    in snake case, `[{name: x}]` env sources as names."""
    raw = values["runLauncher"]["config"]["k8sRunLauncher"]
    config: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("envConfigMaps", "envSecrets"):
            value = [item["name"] for item in value]
        config[_snake(key)] = value
    return config


def _values() -> dict[str, Any]:
    return yaml.safe_load((K8S / "dagster-values.yaml").read_text())


def _instance() -> dict[str, Any]:
    return yaml.safe_load((K8S / "dagster-instance.yaml").read_text())


def test_values_launcher_keys_are_k8s_run_launcher_fields() -> None:
    values = _values()
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    config = launcher_config_from_values(values)
    fields = set(K8sRunLauncher.config_type())
    assert set(config) <= fields, set(config) - fields
    # With what the chart adds itself (instance ConfigMap, service account, password secret,
    # DAGSTER_HOME), the launcher's own schema accepts it.
    rendered = {
        **config,
        "instance_config_map": "dagster-instance",
        "service_account_name": values["serviceAccount"]["name"],
        "postgres_password_secret": values["global"]["postgresqlSecretName"],
        "dagster_home": values["global"]["dagsterHome"],
    }
    result = process_config(K8sRunLauncher.config_type(), rendered)
    assert result.success, result.errors


def test_values_and_instance_yaml_say_the_same() -> None:
    values = _values()
    instance = _instance()
    launcher = instance["run_launcher"]["config"]
    from_values = launcher_config_from_values(values)
    for key, value in from_values.items():
        assert launcher[key] == value, key
    assert launcher["service_account_name"] == values["serviceAccount"]["name"]
    assert launcher["postgres_password_secret"] == values["global"]["postgresqlSecretName"]
    assert launcher["dagster_home"] == values["global"]["dagsterHome"]
    [code] = values["dagster-user-deployments"]["deployments"]
    image = code["image"]
    assert launcher["job_image"] == f"{image['repository']}:{image['tag']}"
    assert [s["name"] for s in code["envConfigMaps"]] == launcher["env_config_maps"]
    assert [s["name"] for s in code["envSecrets"]] == launcher["env_secrets"]
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    coordinator = instance["run_coordinator"]["config"]
    assert queued["maxConcurrentRuns"] == coordinator["max_concurrent_runs"]
    assert queued["tagConcurrencyLimits"] == coordinator["tag_concurrency_limits"]
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    assert monitoring["enabled"] == instance["run_monitoring"]["enabled"]
    assert monitoring["startTimeoutSeconds"] == instance["run_monitoring"]["start_timeout_seconds"]
    assert values["postgresql"]["postgresqlDatabase"] == km.K8S_CONFIG["DAGSTER_PG_DB"]
    assert values["postgresql"]["postgresqlHost"] == km.K8S_CONFIG["DAGSTER_PG_HOST"]


def test_values_check_catches_a_misspelled_launcher_key() -> None:
    values = copy.deepcopy(_values())
    values["runLauncher"]["config"]["k8sRunLauncher"]["jobNamespce"] = "x"
    fields = set(K8sRunLauncher.config_type())
    assert set(launcher_config_from_values(values)) - fields == {"job_namespce"}


def test_code_server_runs_what_compose_runs() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    command = compose["services"]["dagster-code"]["command"]
    assert command[:3] == ["dagster", "code-server", "start"]
    module_args = command[command.index("-m") : command.index("-m") + 2]
    [code] = _values()["dagster-user-deployments"]["deployments"]
    assert code["codeServerArgs"] == module_args


def render_instance(values: dict[str, Any]) -> dict[str, Any]:
    """The dagster.yaml Dagster's chart renders from these values (templates/configmap-instance
    .yaml and helpers/instance/*.tpl, for the keys the values set), release name `dagster`."""
    pg = values["postgresql"]
    storage_config = {
        "postgres_db": {
            "username": pg["postgresqlUsername"],
            "password": {"env": "DAGSTER_PG_PASSWORD"},
            "hostname": pg["postgresqlHost"],
            "db_name": pg["postgresqlDatabase"],
            "port": pg["service"]["port"],
            "params": {},
        }
    }
    launcher = launcher_config_from_values(values)
    launcher.update(
        service_account_name=values["serviceAccount"]["name"],
        dagster_home=values["global"]["dagsterHome"],
        instance_config_map="dagster-instance",
        postgres_password_secret=values["global"]["postgresqlSecretName"],
    )
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    monitoring = values["dagsterDaemon"]["runMonitoring"]
    return {
        "schedule_storage": {
            "module": "dagster_postgres.schedule_storage",
            "class": "PostgresScheduleStorage",
            "config": storage_config,
        },
        "run_storage": {
            "module": "dagster_postgres.run_storage",
            "class": "PostgresRunStorage",
            "config": storage_config,
        },
        "event_log_storage": {
            "module": "dagster_postgres.event_log",
            "class": "PostgresEventLogStorage",
            "config": storage_config,
        },
        "run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher},
        "run_coordinator": {
            "module": "dagster._core.run_coordinator",
            "class": "QueuedRunCoordinator",
            "config": {
                "max_concurrent_runs": queued["maxConcurrentRuns"],
                "tag_concurrency_limits": queued["tagConcurrencyLimits"],
            },
        },
        "run_monitoring": {
            "enabled": monitoring["enabled"],
            "start_timeout_seconds": monitoring["startTimeoutSeconds"],
        },
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
    }


def test_values_render_an_instance_dagster_accepts(tmp_path: Path) -> None:
    from dagster._core.instance.config import dagster_instance_config

    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(render_instance(_values())))
    config, custom_class = dagster_instance_config(str(tmp_path))
    assert custom_class is None
    assert config["run_launcher"]["class"] == "K8sRunLauncher"
    assert config["run_storage"]["config"]["postgres_db"]["password"] == {
        "env": "DAGSTER_PG_PASSWORD"
    }


def test_instance_validation_rejects_a_planted_fault(tmp_path: Path) -> None:
    from dagster._core.errors import DagsterInvalidConfigError
    from dagster._core.instance.config import dagster_instance_config

    rendered = render_instance(_values())
    rendered["run_monitoring"]["start_timeout_secs"] = 300
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(rendered))
    with pytest.raises(DagsterInvalidConfigError):
        dagster_instance_config(str(tmp_path))
