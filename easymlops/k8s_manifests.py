"""The generated part of infra/k8s/: one source for the Kubernetes manifests that repeat what the
settings and the local deployment already say.

- `easymlops-config.yaml`: the ConfigMap of non-secret EASYMLOPS_* settings every platform pod
  reads (`K8S_CONFIG`); the settings below are parsed from exactly these values.
- `rayservice.yaml`: the KubeRay RayService. Its `serveConfigV2` carries what serving/deploy.py
  passes to Serve locally (app name, route, HTTP port and request timeout, replicas, CPUs per
  replica), computed from the same Settings fields; the app itself is built in the cluster by
  `serve_app` with the same `ServingConfig.from_settings` and fingerprint as `deploy()`.
- `kafka.yaml`: Strimzi's Kafka (KRaft), its KafkaNodePool and one KafkaTopic per topic of
  `Settings.topics`, with `Settings.topic_partitions` partitions.
- `flinkdeployment.yaml`: the Flink operator's FlinkDeployment of the validation job, with the
  arguments easymlops.k8s gives the Pipes submission (`flink_run_args`).

    python -m easymlops.k8s_manifests            # rewrite the generated files
    python -m easymlops.k8s_manifests --check    # exit 1 if a committed file differs
    python -m easymlops.k8s_manifests schemas CRD_DIR OUT_DIR   # CRDs -> JSON schemas (make)

tests/test_k8s_manifests.py checks the committed files equal what this module generates.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from easymlops import k8s as ek8s
from easymlops.flink_cluster import PROMETHEUS_REPORTER
from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
K8S_DIR = ROOT / "infra" / "k8s"
NAMESPACE = "easymlops"
PLATFORM_IMAGE = "easymlops/platform:latest"
FLINK_IMAGE = "easymlops/flink:latest"
PART_OF = {"app.kubernetes.io/part-of": "easymlops"}
# The Ray version of the platform image (uv.lock); KubeRay needs it to manage the cluster.
RAY_VERSION = "2.60.0"
KAFKA_CLUSTER = "kafka"
KAFKA_VERSION = "3.9.0"  # the newest broker Strimzi 0.45 (infra/maven/k8s-crds/pom.xml) runs
KAFKA_REPLICAS = 3
# What flink-kubernetes-operator 1.10 (the CRD the tests validate against) calls Flink 2.x is
# unknown to it: see infra/k8s/README.md. The image is Flink 2.2 (infra/flink/Dockerfile).
FLINK_VERSION = "v2_2"
FLINK_PYTHON_JAR = "local:///opt/flink/opt/flink-python-2.2.1.jar"
RAYSERVICE_NAME = "easymlops-serve"
SERVE_IMPORT_PATH = "easymlops.k8s_manifests:serve_app"

# The non-secret settings of every platform pod (ConfigMap easymlops-config). Secrets
# (EASYMLOPS_REDIS_URL, EASYMLOPS_PG_PASSWORD, EASYMLOPS_SERVE_API_KEY, AWS keys) are in the
# Secret easymlops-secrets, created by the operator of the cluster, never here.
K8S_CONFIG: dict[str, str] = {
    "EASYMLOPS_KUBERNETES": "true",
    "EASYMLOPS_HOST": f"{RAYSERVICE_NAME}-serve-svc",
    "EASYMLOPS_BIND_HOST": "0.0.0.0",
    "EASYMLOPS_SERVE_PORT": "8000",
    "EASYMLOPS_SERVE_REPLICAS": "2",
    "EASYMLOPS_SERVE_NUM_CPUS": "1",
    "EASYMLOPS_SERVE_REQUEST_TIMEOUT_S": "10",
    "EASYMLOPS_KAFKA_BOOTSTRAP": f"{KAFKA_CLUSTER}-kafka-bootstrap:9092",
    "EASYMLOPS_TOPIC_PARTITIONS": "6",
    "EASYMLOPS_MLFLOW_TRACKING_URI": "http://mlflow:5000",
    "EASYMLOPS_RAY_ADDRESS": f"ray://{RAYSERVICE_NAME}-head-svc:10001",
    "EASYMLOPS_LAKE_URI": "s3://lake",
    "EASYMLOPS_HOME": "/data/easymlops",
    "EASYMLOPS_WAREHOUSE_BACKEND": "postgres",
    "EASYMLOPS_PG_HOST": "postgres",
    "EASYMLOPS_PG_PORT": "5432",
    "EASYMLOPS_PG_DBNAME": "warehouse",
    # Steps in processes of their own, forked once the code is loaded (settings.py).
    "EASYMLOPS_DAGSTER_EXECUTOR": "forkserver",
    "DAGSTER_PG_HOST": "postgres",
    "DAGSTER_PG_DB": "dagster",
    "AWS_REGION": "us-east-1",
    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel-collector:4318",
}


def k8s_settings() -> Settings:
    """The Settings a platform pod reads from the ConfigMap (nothing else in its environment)."""
    prefix = "EASYMLOPS_"
    values = {k[len(prefix) :].lower(): v for k, v in K8S_CONFIG.items() if k.startswith(prefix)}
    return Settings.model_validate(values)


def _meta(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "namespace": NAMESPACE, "labels": dict(PART_OF), **extra}


def config_map() -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(ek8s.CONFIG_MAP),
        "data": dict(K8S_CONFIG),
    }


# ---- Ray Serve on KubeRay ------------------------------------------------------------------
def serve_config(settings: Settings) -> dict[str, Any]:
    """Serve's declarative config: what serving/deploy.py's `deploy` passes to `serve.start` and
    `deployment.options` for `settings`, plus the import path of the in-cluster builder."""
    from serving.app import DEPLOYMENT_NAME
    from serving.deploy import APP_NAME, deployment_options

    return {
        "http_options": {
            "host": "0.0.0.0",
            "port": settings.serve_port,
            "request_timeout_s": settings.serve_request_timeout_s,
        },
        "applications": [
            {
                "name": APP_NAME,
                "route_prefix": "/",
                "import_path": SERVE_IMPORT_PATH,
                "deployments": [{"name": DEPLOYMENT_NAME, **deployment_options(settings)}],
            }
        ],
    }


def serve_app(args: dict[str, str] | None = None) -> Any:
    """The Serve app, built where Serve imports it (`import_path` above): the same
    `ServingConfig.from_settings` and fingerprint as serving.deploy.deploy, from the pod's own
    settings (ConfigMap + Secret). The deployment options of serveConfigV2 apply on top."""
    from typing import cast

    from ray import serve

    from easymlops.settings import get_settings
    from serving.app import PurchasePredictor
    from serving.deploy import deployment_fingerprint, deployment_options
    from serving.model import ServingConfig

    settings = get_settings()
    config = ServingConfig.from_settings(settings)
    options = deployment_options(settings)
    fingerprint = deployment_fingerprint(config, options, route_prefix="/")
    deployment = cast(serve.Deployment, PurchasePredictor)
    return deployment.options(**options).bind(config, fingerprint)


_NON_ROOT = {
    "runAsNonRoot": True,
    "runAsUser": 10001,
    "runAsGroup": 10001,
    "fsGroup": 10001,
    "seccompProfile": {"type": "RuntimeDefault"},
}
_NO_ESCALATION = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
_ENV_FROM = [
    {"configMapRef": {"name": ek8s.CONFIG_MAP}},
    {"secretRef": {"name": ek8s.SECRET}},
]


def _ray_pod(
    container: str, ports: list[tuple[str, int]], requests: dict[str, str], limits: dict[str, str]
) -> dict[str, Any]:
    return {
        "metadata": {"labels": dict(PART_OF)},
        "spec": {
            "securityContext": _NON_ROOT,
            "containers": [
                {
                    "name": container,
                    "image": PLATFORM_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "envFrom": _ENV_FROM,
                    "ports": [{"name": n, "containerPort": p} for n, p in ports],
                    "resources": {"requests": requests, "limits": limits},
                    "securityContext": _NO_ESCALATION,
                    "volumeMounts": [{"name": "shm", "mountPath": "/dev/shm"}],
                }
            ],
            "volumes": [{"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "2Gi"}}],
        },
    }


def ray_service(settings: Settings) -> dict[str, Any]:
    head_ports = [
        ("gcs-server", 6379),
        ("dashboard", 8265),
        ("client", 10001),
        ("serve", settings.serve_port),
        ("metrics", 8090),
    ]
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": _meta(RAYSERVICE_NAME),
        "spec": {
            "serveConfigV2": yaml.safe_dump(serve_config(settings), sort_keys=False),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    # No Serve replicas on the head: it keeps the GCS and the controller.
                    "rayStartParams": {"num-cpus": "0", "dashboard-host": "0.0.0.0"},
                    "template": _ray_pod(
                        "ray-head",
                        head_ports,
                        {"cpu": "1", "memory": "2Gi"},
                        {"cpu": "2", "memory": "4Gi"},
                    ),
                },
                "workerGroupSpecs": [
                    {
                        "groupName": "cpu",
                        "replicas": 2,
                        "minReplicas": 1,
                        "maxReplicas": 4,
                        "rayStartParams": {},
                        "template": _ray_pod(
                            "ray-worker",
                            [("serve", settings.serve_port), ("metrics", 8090)],
                            {"cpu": "2", "memory": "4Gi"},
                            {"cpu": "2", "memory": "4Gi"},
                        ),
                    }
                ],
            },
        },
    }


# ---- Kafka on Strimzi ----------------------------------------------------------------------
def kafka_resources(settings: Settings) -> list[dict[str, Any]]:
    cluster_label = {**PART_OF, "strimzi.io/cluster": KAFKA_CLUSTER}
    kafka = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "Kafka",
        "metadata": {
            "name": KAFKA_CLUSTER,
            "namespace": NAMESPACE,
            "labels": dict(PART_OF),
            "annotations": {"strimzi.io/kraft": "enabled", "strimzi.io/node-pools": "enabled"},
        },
        "spec": {
            "kafka": {
                "version": KAFKA_VERSION,
                "metadataVersion": "3.9-IV0",
                # Inside the cluster only; no external listener.
                "listeners": [{"name": "plain", "port": 9092, "type": "internal", "tls": False}],
                "config": {
                    "offsets.topic.replication.factor": KAFKA_REPLICAS,
                    "transaction.state.log.replication.factor": KAFKA_REPLICAS,
                    "transaction.state.log.min.isr": 2,
                    "default.replication.factor": KAFKA_REPLICAS,
                    "min.insync.replicas": 2,
                    # Topics come from the KafkaTopic resources only.
                    "auto.create.topics.enable": False,
                },
            },
            "entityOperator": {"topicOperator": {}},
        },
    }
    pool = {
        "apiVersion": "kafka.strimzi.io/v1beta2",
        "kind": "KafkaNodePool",
        "metadata": {"name": "dual-role", "namespace": NAMESPACE, "labels": cluster_label},
        "spec": {
            "replicas": KAFKA_REPLICAS,
            "roles": ["controller", "broker"],
            "storage": {
                "type": "jbod",
                "volumes": [
                    {
                        "id": 0,
                        "type": "persistent-claim",
                        "size": "50Gi",
                        "deleteClaim": False,
                        "kraftMetadata": "shared",
                    }
                ],
            },
            "resources": {
                "requests": {"cpu": "500m", "memory": "2Gi"},
                "limits": {"cpu": "2", "memory": "2Gi"},
            },
        },
    }
    topics = [
        {
            "apiVersion": "kafka.strimzi.io/v1beta2",
            "kind": "KafkaTopic",
            "metadata": {
                "name": topic.replace(".", "-").replace("_", "-"),
                "namespace": NAMESPACE,
                "labels": cluster_label,
            },
            "spec": {
                "topicName": topic,
                "partitions": settings.topic_partitions,
                "replicas": KAFKA_REPLICAS,
                "config": {"min.insync.replicas": 2},
            },
        }
        for topic in settings.topics
    ]
    return [kafka, pool, *topics]


# ---- the Flink validation job on the Flink operator ----------------------------------------
def flink_deployment() -> dict[str, Any]:
    sub = ek8s.FlinkSubmission(image=FLINK_IMAGE)
    args = ek8s.flink_run_args(sub)
    return {
        "apiVersion": "flink.apache.org/v1beta1",
        "kind": "FlinkDeployment",
        "metadata": _meta("flink-validation"),
        "spec": {
            "image": FLINK_IMAGE,
            "imagePullPolicy": "IfNotPresent",
            "flinkVersion": FLINK_VERSION,
            "serviceAccount": "flink",
            "flinkConfiguration": {
                "taskmanager.numberOfTaskSlots": "2",
                "execution.checkpointing.dir": "s3://flink/checkpoints",
                "execution.checkpointing.savepoint-dir": "s3://flink/savepoints",
                "restart-strategy.type": "fixed-delay",
                "restart-strategy.fixed-delay.attempts": "2147483647",
                "restart-strategy.fixed-delay.delay": "10 s",
                # The job's routing counters and Flink's own metrics, for Prometheus.
                "metrics.reporter.prom.factory.class": PROMETHEUS_REPORTER,
                "metrics.reporter.prom.port": "9249",
            },
            "podTemplate": {
                "metadata": {"labels": dict(PART_OF)},
                "spec": {
                    # The image's `flink` user (uid 9999); the operator starts it as that user.
                    "securityContext": {
                        "runAsNonRoot": True,
                        "runAsUser": 9999,
                        "runAsGroup": 9999,
                        "fsGroup": 9999,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "containers": [
                        {
                            "name": "flink-main-container",
                            "env": [
                                *ek8s.submit_env(sub),
                                # Checkpoints on S3: Flink's bundled S3 filesystem plugin.
                                {
                                    "name": "ENABLE_BUILT_IN_PLUGINS",
                                    "value": "flink-s3-fs-hadoop-2.2.1.jar",
                                },
                            ],
                            # AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY for the checkpoints.
                            "envFrom": [{"secretRef": {"name": ek8s.SECRET}}],
                            "securityContext": _NO_ESCALATION,
                        }
                    ],
                },
            },
            "jobManager": {"replicas": 1, "resource": {"cpu": 1, "memory": "2048m"}},
            "taskManager": {"resource": {"cpu": 2, "memory": "4096m"}},
            "job": {
                "jarURI": FLINK_PYTHON_JAR,
                "entryClass": "org.apache.flink.client.python.PythonDriver",
                "args": args,
                "parallelism": sub.parallelism,
                # Upgrades stop the job with a savepoint and resume from it.
                "upgradeMode": "savepoint",
                "state": "running",
            },
        },
    }


# ---- files -----------------------------------------------------------------------------------
_HEADER = (
    "# GENERATED by `python -m easymlops.k8s_manifests` from easymlops/k8s_manifests.py and the\n"
    "# settings; do not edit (tests/test_k8s_manifests.py fails when this file differs).\n"
)


class _Dumper(yaml.SafeDumper):
    """No anchors/aliases (a reader sees every value where it applies); multi-line strings
    (serveConfigV2) as literal blocks."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(docs: list[dict[str, Any]]) -> str:
    return _HEADER + "---\n".join(
        yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=100) for d in docs
    )


def generated() -> dict[str, str]:
    """File name under infra/k8s/ -> its content."""
    settings = k8s_settings()
    return {
        "easymlops-config.yaml": _dump([config_map()]),
        "rayservice.yaml": _dump([ray_service(settings)]),
        "kafka.yaml": _dump(kafka_resources(settings)),
        "flinkdeployment.yaml": _dump([flink_deployment()]),
    }


# ---- CRDs -> JSON schemas (make k8s-schemas) -------------------------------------------------
def crd_schemas(crd_dir: Path, out_dir: Path) -> list[Path]:
    """Write `<group>_<version>_<kind>.json` (lowercase) for every served version of every CRD
    YAML in crd_dir: the version's openAPIV3Schema, unchanged."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for path in sorted(crd_dir.glob("*.y*ml")):
        for crd in yaml.safe_load_all(path.read_text()):
            if not crd or crd.get("kind") != "CustomResourceDefinition":
                continue
            spec = crd["spec"]
            for version in spec["versions"]:
                if not version.get("served", True):
                    continue
                schema = version["schema"]["openAPIV3Schema"]
                name = f"{spec['group']}_{version['name']}_{spec['names']['kind']}".lower()
                target = out_dir / f"{name}.json"
                target.write_text(json.dumps(schema, indent=1, sort_keys=True))
                written.append(target)
    if not written:
        raise SystemExit(f"no CustomResourceDefinition in {crd_dir}")
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m easymlops.k8s_manifests")
    parser.add_argument("--check", action="store_true", help="exit 1 if a committed file differs")
    sub = parser.add_subparsers(dest="command")
    schemas = sub.add_parser("schemas", help="extract openAPIV3Schema from CRD YAMLs")
    schemas.add_argument("crd_dir", type=Path)
    schemas.add_argument("out_dir", type=Path)
    args = parser.parse_args(argv)
    if args.command == "schemas":
        for path in crd_schemas(args.crd_dir, args.out_dir):
            print(path)
        return 0
    stale = []
    for name, text in generated().items():
        path = K8S_DIR / name
        if args.check:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"stale: {', '.join(stale)} (run python -m easymlops.k8s_manifests)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
