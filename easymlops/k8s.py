"""Kubernetes: the pod that submits the Flink validation job (flink_jobs/validation_job.py,
Kafka mode) to a Flink session cluster, for `PipesK8sClient` (easymlops_assets/k8s.py).

The pod runs the infra/flink image (its own entrypoint, which drops to the `flink` user) and
`bin/flink run --detached --target remote` against the jobmanager's REST service, the same
submission as `easymlops.flink_cluster.submit` does on one machine. The Python driver runs in
the pod, builds the job graph from `EASYMLOPS_*` settings and hands it to the cluster, so only
this pod needs those settings; they come from a ConfigMap (bootstrap servers, topics, TTL) and a
Secret (the Redis URL, which may carry a password), never from literals in the spec:

    ConfigMap easymlops-config    EASYMLOPS_KAFKA_BOOTSTRAP, EASYMLOPS_TOPIC_RAW|VALIDATED|INVALID,
                                  EASYMLOPS_SESSION_TTL_SECONDS   (topics and TTL optional)
    Secret    easymlops-secrets   EASYMLOPS_REDIS_URL

The job is long-running; the pod exits once it is submitted. A second submission while the job
runs would start a second copy with the same consumer group and transactional-id prefix (the two
would fence each other's transactions), so the pod first asks the cluster (`flink list
--running`) and does nothing if a job of that name is already running.

What is not here: the Flink cluster itself (a session cluster from the same image, or the Flink
Kubernetes operator, see infra/flink/README.md) and its checkpoint storage. Nothing in this
module talks to Kubernetes; it only builds dicts, tested in tests/test_k8s_specs.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: The name `run_kafka` gives the job (`env.execute(...)` in flink_jobs/validation_job.py).
JOB_NAME = "easymlops stream validation"
#: Inside the infra/flink image.
FLINK_BIN = "/opt/flink/bin/flink"
JOB_FILE = "/opt/easymlops/flink_jobs/validation_job.py"

CONFIG_MAP = "easymlops-config"
SECRET = "easymlops-secrets"

#: (variable, source, required): source "config" = the ConfigMap, "secret" = the Secret; the key
#: in either is the variable's name. Optional ones fall back to easymlops.settings' defaults.
SUBMIT_ENV: tuple[tuple[str, str, bool], ...] = (
    ("EASYMLOPS_KAFKA_BOOTSTRAP", "config", True),
    ("EASYMLOPS_TOPIC_RAW", "config", False),
    ("EASYMLOPS_TOPIC_VALIDATED", "config", False),
    ("EASYMLOPS_TOPIC_INVALID", "config", False),
    ("EASYMLOPS_SESSION_TTL_SECONDS", "config", False),
    ("EASYMLOPS_REDIS_URL", "secret", True),
)

# `$1` = rest address, `$2` = rest port, then the job's `flink run` arguments. Bash, because the
# image has no other shell tooling than the Flink CLI; `flink list` prints
# "<date> : <job id> : <name> (RUNNING)".
_SUBMIT_SCRIPT = """\
set -euo pipefail
target=(--target remote -Drest.address="$1" -Drest.port="$2")
shift 2
if running="$(FLINK_BIN list --running "${target[@]}")" \\
   && grep -F -- ": JOB_NAME (RUNNING)" <<<"$running"; then
  echo "JOB_NAME is already running: not submitting a second copy"
  exit 0
fi
exec FLINK_BIN run "${target[@]}" --detached "$@"
""".replace("FLINK_BIN", FLINK_BIN).replace("JOB_NAME", JOB_NAME)


@dataclass(frozen=True)
class FlinkSubmission:
    """What to submit, and where. Defaults suit a namespace with a `flink-jobmanager` Service
    (REST port 8081) in front of a session cluster started from the infra/flink image."""

    image: str = "easymlops-flink:2.2.1"
    namespace: str = "easymlops"
    jobmanager_host: str = "flink-jobmanager"
    jobmanager_port: int = 8081
    config_map: str = CONFIG_MAP
    secret: str = SECRET
    checkpoint_interval_ms: int = 10_000
    #: A durable URI (s3://...) the cluster can write; None = the cluster's own
    #: `execution.checkpointing.dir`.
    checkpoint_dir: str | None = None
    #: Resume from this savepoint (`flink run --fromSavepoint`).
    savepoint: str | None = None
    parallelism: int = 1
    #: None = the job's defaults (`easymlops-flink-validator`); keep stable across restarts.
    group_id: str | None = None
    transactional_id_prefix: str | None = None
    # The client: a JVM plus the Python driver, for the few seconds of a submission.
    requests: dict[str, str] = field(default_factory=lambda: {"cpu": "250m", "memory": "768Mi"})
    limits: dict[str, str] = field(default_factory=lambda: {"cpu": "1", "memory": "1536Mi"})
    #: A hung submission (jobmanager unreachable) fails the pod after this long.
    deadline_seconds: int = 900


def flink_run_args(sub: FlinkSubmission) -> list[str]:
    """The arguments after `flink run --target remote ... --detached`: the job file, its mode
    and options."""
    args: list[str] = []
    if sub.savepoint:
        args += ["--fromSavepoint", sub.savepoint]
    args += ["--python", JOB_FILE, "kafka"]
    args += ["--checkpoint-interval-ms", str(sub.checkpoint_interval_ms)]
    args += ["--parallelism", str(sub.parallelism)]
    if sub.checkpoint_dir:
        args += ["--checkpoint-dir", sub.checkpoint_dir]
    if sub.group_id:
        args += ["--group-id", sub.group_id]
    if sub.transactional_id_prefix:
        args += ["--transactional-id-prefix", sub.transactional_id_prefix]
    return args


def container_args(sub: FlinkSubmission) -> list[str]:
    """The container's `args` (no `command`: the image's entrypoint runs them as `flink`)."""
    return [
        "bash",
        "-c",
        _SUBMIT_SCRIPT,
        "flink-submit",  # $0
        sub.jobmanager_host,
        str(sub.jobmanager_port),
        *flink_run_args(sub),
    ]


def submit_env(sub: FlinkSubmission) -> list[dict[str, Any]]:
    """The container's `env`: every value a reference into the ConfigMap or the Secret."""
    env: list[dict[str, Any]] = []
    for name, source, required in SUBMIT_ENV:
        if source == "secret":
            ref = {"secretKeyRef": {"name": sub.secret, "key": name, "optional": not required}}
        else:
            ref = {
                "configMapKeyRef": {"name": sub.config_map, "key": name, "optional": not required}
            }
        env.append({"name": name, "valueFrom": ref})
    return env


def base_pod_meta(sub: FlinkSubmission) -> dict[str, Any]:
    """`base_pod_meta` for `PipesK8sClient.run` (it sets the name and adds Dagster's labels)."""
    return {
        "labels": {
            "app.kubernetes.io/name": "easymlops",
            "app.kubernetes.io/component": "flink-validation-submit",
        },
        "annotations": {"easymlops/flink-job": JOB_NAME},
    }


def base_pod_spec(sub: FlinkSubmission) -> dict[str, Any]:
    """`base_pod_spec` for `PipesK8sClient.run`, camelCase as in a manifest. The first (only)
    container is the one Pipes injects its context into."""
    return {
        "restartPolicy": "Never",
        "activeDeadlineSeconds": sub.deadline_seconds,
        # The pod talks to the Flink REST service only, never to the Kubernetes API.
        "automountServiceAccountToken": False,
        "securityContext": {"runAsNonRoot": True, "runAsUser": 9999, "runAsGroup": 9999},
        "containers": [
            {
                "name": "flink-submit",
                "image": sub.image,
                "imagePullPolicy": "IfNotPresent",
                "args": container_args(sub),
                "env": submit_env(sub),
                "resources": {"requests": dict(sub.requests), "limits": dict(sub.limits)},
                "securityContext": {"allowPrivilegeEscalation": False},
            }
        ],
    }


def pipes_run_kwargs(sub: FlinkSubmission) -> dict[str, Any]:
    """Everything `PipesK8sClient.run(context=..., **kwargs)` needs to submit the job. No
    `command`: the image's entrypoint stays in place."""
    return {
        "image": sub.image,
        "namespace": sub.namespace,
        "base_pod_meta": base_pod_meta(sub),
        "base_pod_spec": base_pod_spec(sub),
    }
