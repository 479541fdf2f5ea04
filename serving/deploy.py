"""Deploy the serving app onto the running Ray head and wait until it is ready.

Callable from a short-lived process (a Dagster run, the CLI): Serve's controller is a detached
actor on the cluster, so the app keeps running after the deploying process exits. Everything
a replica needs travels as deployment init args (`ServingConfig`), never through the
environment of the deploying process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import logging
import time
from pathlib import Path
from typing import Any, cast

import httpx
import ray
from ray import serve
from ray._private import ray_constants
from ray.serve.schema import ApplicationStatus

from easymlops.settings import Settings
from serving.app import PurchasePredictor
from serving.model import ServingConfig

log = logging.getLogger(__name__)

APP_NAME = "purchase"
RAY_NAMESPACE = "easymlops"


def connect(settings: Settings) -> None:
    """Attach this process to the Ray head of `settings` (a no-op if already attached).

    Ray's `uv run` hook is switched off first: when the driver runs under `uv run` (pytest, a
    Dagster run, the CLI), Ray 2.60 otherwise ships the current directory as the job's
    working_dir and starts every worker with `uv run`, which builds a fresh ~1.7 GB virtualenv
    per code snapshot inside the Ray session and pins the detached Serve controller and
    replicas to that snapshot. Replicas must run in the cluster's own environment instead (the
    project venv of the embedded head, the image on KubeRay).
    """
    if ray.is_initialized():
        env = ray.get_runtime_context().runtime_env or {}
        if "py_executable" in env or "working_dir" in env:
            log.warning(
                "this process joined Ray with runtime_env %s; Serve replicas started from here "
                "inherit it (set RAY_ENABLE_UV_RUN_RUNTIME_ENV=0 before the first ray.init)",
                {k: env[k] for k in ("py_executable", "working_dir") if k in env},
            )
        return
    ray_constants.RAY_ENABLE_UV_RUN_RUNTIME_ENV = False
    if not settings.ray_address:
        # The embedded head is single-node on loopback: without this Ray swaps 127.0.0.1 for
        # the machine's LAN address (see easymlops.stack, which starts the head the same way).
        ray_constants.ENABLE_RAY_CLUSTER = False
    ray.init(
        address=settings.ray,
        namespace=RAY_NAMESPACE,
        ignore_reinit_error=True,
        log_to_driver=False,
    )


def app_url(settings: Settings, route_prefix: str = "/") -> str:
    return settings.serve_url + route_prefix.rstrip("/")


def deployment_options(
    settings: Settings,
    *,
    num_cpus: float | None = None,
    replicas: int | None = None,
    access_log: bool = False,
) -> dict[str, Any]:
    """The Serve deployment options for `settings`, as `Deployment.options` and Serve's
    declarative config (serveConfigV2 on Kubernetes) both take them; `num_cpus` and `replicas`
    override the settings'."""
    return {
        "num_replicas": settings.serve_replicas if replicas is None else replicas,
        "ray_actor_options": {
            "num_cpus": settings.serve_num_cpus if num_cpus is None else num_cpus
        },
        "max_ongoing_requests": settings.serve_max_ongoing_requests,
        # Beyond the queue, 503 at once (Serve's plain-text "Request dropped due to
        # backpressure") with Retry-After, rather than a backlog that ends in timeouts.
        "max_queued_requests": settings.serve_max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": settings.serve_retry_after_s},
        # Off unless asked (deploy(access_log=True)): in throughput-optimized mode Serve buffers
        # the replica's access log and writes 1,000 records at a time on the event loop, a
        # 20-30 ms stall every 1,000 requests. NGINX in front keeps a JSON access log with the
        # request id.
        "logging_config": {"enable_access_log": access_log},
    }


def deploy(
    settings: Settings,
    *,
    wait_ready: bool = True,
    timeout: float = 180,
    poll_interval_s: float = 10.0,
    app_name: str = APP_NAME,
    route_prefix: str = "/",
    num_cpus: float | None = None,
    replicas: int | None = None,
    access_log: bool = False,
    force: bool = False,
) -> str:
    """Start Serve (HTTP on `settings.listen_host:settings.serve_port`) if it is not running,
    deploy or update the app, and return its base URL.

    Idempotent: if the app already runs with the same configuration and code (compared by a
    fingerprint the replica reports at GET /healthz), nothing is redeployed, because Serve
    would replace the replica (~10 s, with requests stalling meanwhile) for nothing; a running
    app picks up a new champion by itself within `poll_interval_s`. `force` redeploys anyway.
    With `wait_ready`, returns only once GET /readyz answers 200 and raises
    (TimeoutError/RuntimeError naming the reason) otherwise; without it, returns as soon as the
    deployment is submitted (the app may answer 503 until a model appears).
    """
    started = time.monotonic()
    connect(settings)
    # Cluster-scoped and fixed once Serve runs; a different port later raises, which is what we
    # want rather than a silently unreachable app.
    serve.start(
        http_options={
            "host": settings.listen_host,
            "port": settings.serve_port,
            # A request waiting for a replica (e.g. while Serve replaces a dead one) gets an
            # error after this long instead of waiting without end.
            "request_timeout_s": settings.serve_request_timeout_s,
        }
    )
    config = ServingConfig.from_settings(settings, poll_interval_s=poll_interval_s)
    url = app_url(settings, route_prefix)
    options = deployment_options(
        settings, num_cpus=num_cpus, replicas=replicas, access_log=access_log
    )
    fingerprint = deployment_fingerprint(config, options, route_prefix=route_prefix)
    if not force and _running_fingerprint(app_name, url) == fingerprint:
        log.info("Serve app %r already runs this configuration at %s", app_name, url)
    else:
        # The decorators make PurchasePredictor a serve.Deployment; type checkers see the class.
        deployment = cast(serve.Deployment, PurchasePredictor).options(**options)
        # Not serve.run: it blocks without a deadline (e.g. forever if the replica cannot be
        # scheduled); we submit and then wait with our own timeout and a reason on failure.
        target = serve.RunTarget(
            deployment.bind(config, fingerprint), name=app_name, route_prefix=route_prefix
        )
        serve.run_many(
            [target],
            wait_for_ingress_deployment_creation=False,
            wait_for_applications_running=False,
        )
        log.info("submitted Serve app %r at %s", app_name, url)
    if wait_ready:
        _wait_ready(
            url, app_name, settings.serve_headers, deadline=started + timeout, timeout=timeout
        )
        log.info("Serve app %r ready at %s after %.1fs", app_name, url, time.monotonic() - started)
    return url


# The modules a replica imports (tests/test_serving.py checks the list is complete); their source
# is part of the deployment fingerprint, so a code change redeploys and nothing else does.
REPLICA_MODULES: tuple[str, ...] = (
    "easymlops.features",
    "easymlops.registry",
    "easymlops.schema",
    "easymlops.session_features",
    "easymlops.settings",
    "easymlops.telemetry",
    "serving.app",
    "serving.features",
    "serving.metrics",
    "serving.model",
    "serving.prediction_log",
    "serving.schemas",
    "serving.tracing",
)


def deployment_fingerprint(
    config: ServingConfig, options: dict[str, Any], *, route_prefix: str
) -> str:
    """A digest of everything that makes one deployment differ from another: its init args
    (the API key too, which repr leaves out), its options (`deployment_options`), route and
    the source of the code a replica runs."""
    digest = hashlib.sha256(
        repr((dataclasses.astuple(config), sorted(options.items()), route_prefix)).encode()
    )
    for name in REPLICA_MODULES:
        spec = importlib.util.find_spec(name)
        if spec is None or spec.origin is None:
            raise RuntimeError(f"cannot locate module {name}")
        digest.update(name.encode())
        digest.update(Path(spec.origin).read_bytes())
    return digest.hexdigest()[:16]


def _running_fingerprint(app_name: str, url: str) -> str | None:
    """The fingerprint the running app reports, or None if it is not running (or too old to
    report one)."""
    status, _ = _app_status(app_name)
    if status != ApplicationStatus.RUNNING.value:
        return None
    try:
        response = httpx.get(f"{url}/healthz", timeout=5.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    return response.json().get("deployment")


def _app_status(app_name: str) -> tuple[str, str]:
    app = serve.status().applications.get(app_name)
    if app is None:
        return "NOT_STARTED", ""
    return str(app.status.value if hasattr(app.status, "value") else app.status), app.message


def _wait_ready(
    url: str, app_name: str, headers: dict[str, str], *, deadline: float, timeout: float
) -> None:
    reason = "no answer yet"
    with httpx.Client(timeout=5.0, headers=headers) as http:
        while True:
            status, message = _app_status(app_name)
            if status in (ApplicationStatus.DEPLOY_FAILED.value, ApplicationStatus.UNHEALTHY.value):
                raise RuntimeError(f"Serve app {app_name!r} is {status}: {message}")
            if status == ApplicationStatus.RUNNING.value:
                try:
                    response = http.get(f"{url}/readyz")
                except httpx.HTTPError as exc:
                    reason = f"GET {url}/readyz failed: {type(exc).__name__}: {exc}"
                else:
                    if response.status_code == 200:
                        return
                    reason = f"GET {url}/readyz -> {response.status_code} {response.text[:500]}"
            else:
                reason = f"Serve app {app_name!r} is {status} {message}".strip()
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"Serve app {app_name!r} not ready after {timeout:.0f}s: {reason}"
                )
            time.sleep(0.5)


def undeploy(settings: Settings, *, app_name: str = APP_NAME) -> None:
    """Delete the app (its replicas stop); Serve itself and other apps keep running."""
    connect(settings)
    if app_name in serve.status().applications:
        serve.delete(app_name)
        log.info("deleted Serve app %r", app_name)


def replica_pids(settings: Settings, app_name: str = APP_NAME) -> set[int]:
    """The processes of the app's live replicas, asked of the head's dashboard by its address
    (Ray's own discovery refuses when a second head runs on the machine, as under tests)."""
    from ray.util.state import list_actors

    from easymlops.services.ray import dashboard_url

    actors = list_actors(
        address=dashboard_url(settings), filters=[("state", "=", "ALIVE")], limit=1000
    )
    return {
        int(a.pid)
        for a in actors
        if (a.name or "").startswith(f"SERVE_REPLICA::{app_name}#") and a.pid
    }
