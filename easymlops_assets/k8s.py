"""The Flink validation job submitted to Kubernetes from Dagster, through dagster-k8s's
`PipesK8sClient` (the pod is built in easymlops/k8s.py).

Not under defs/, so not loaded by default: a local stack has no Kubernetes. A Kubernetes
deployment adds the asset and the `pipes_k8s_client` resource to the definitions (see
infra/README.md, "Kubernetes (dagster-k8s)").

The pod runs the Flink CLI, which does not speak the Pipes protocol: Dagster forwards its log
lines to the run's stdout, the asset succeeds when the pod exits 0 (job submitted, or already
running) and fails with the pod's last log lines otherwise. The asset records what was
submitted; the Flink job id is in the forwarded log (`Job has been submitted with JobID ...`).
"""

import dagster as dg
from dagster_k8s import PipesK8sClient

from easymlops.k8s import JOB_NAME, FlinkSubmission, flink_run_args, pipes_run_kwargs

#: The resource key the asset asks for.
PIPES_K8S_CLIENT = "pipes_k8s_client"


def flink_validation_k8s_asset(
    submission: FlinkSubmission | None = None,
    *,
    name: str = "flink_validation_k8s",
    group_name: str = "ingestion",
    deps: tuple[str, ...] = ("events_raw",),
) -> dg.AssetsDefinition:
    """An asset that submits flink_jobs/validation_job.py (Kafka mode) to the Flink session
    cluster in Kubernetes, from a pod of the infra/flink image (easymlops.k8s)."""
    sub = submission or FlinkSubmission()

    @dg.asset(
        name=name,
        group_name=group_name,
        deps=list(deps),
        kinds={"kubernetes", "flink"},
        required_resource_keys={PIPES_K8S_CLIENT},
        description=f"Submits '{JOB_NAME}' (events.raw -> events.validated | events.invalid, "
        "exactly-once) to the Flink cluster in Kubernetes; a no-op if it is already running.",
    )
    def _asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        client: PipesK8sClient = getattr(context.resources, PIPES_K8S_CLIENT)
        client.run(context=context, **pipes_run_kwargs(sub))
        return dg.MaterializeResult(
            metadata={
                "image": sub.image,
                "namespace": sub.namespace,
                "jobmanager": f"{sub.jobmanager_host}:{sub.jobmanager_port}",
                "flink_run_args": dg.MetadataValue.json(flink_run_args(sub)),
            }
        )

    return _asset
