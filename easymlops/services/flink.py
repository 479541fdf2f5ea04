"""The standalone Flink cluster (easymlops.flink_cluster): a jobmanager and a taskmanager sharing
one data folder (configuration, checkpoints, savepoints); only on request, `up --with-flink`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from easymlops import flink_cluster
from easymlops.services.supervisor import Launch, Spec, StackError, data_dir, read_record
from easymlops.settings import Settings

#: Both roles, started together by `up --with-flink`.
NAMES: tuple[str, ...] = ("flink-jobmanager", "flink-taskmanager")


def flink_data_dir(settings: Settings) -> Path:
    """The Flink cluster's configuration, checkpoints and savepoints (both processes share it)."""
    return data_dir(settings, "flink")


def _launch(role: str) -> Callable[[Settings], Launch]:
    def launch(settings: Settings) -> Launch:
        try:
            argv, env = flink_cluster.prepare(settings, flink_data_dir(settings), role)
        except flink_cluster.FlinkSetupError as exc:
            raise StackError(f"flink-{role}: {exc}") from None
        if role != "taskmanager":
            return Launch(argv, env)
        # A fresh id per start, so health means "this process registered", not an old one
        # the jobmanager has not yet declared lost.
        resource_id = f"easymlops-tm-{os.urandom(4).hex()}"
        return Launch(
            [*argv, "-D", f"taskmanager.resource-id={resource_id}"],
            env,
            {"resource_id": resource_id},
        )

    return launch


def _taskmanager_health(settings: Settings) -> str | None:
    record = read_record(settings, "flink-taskmanager")
    if record is None:
        return "not started"
    return flink_cluster.taskmanager_health(settings, str(record.extra.get("resource_id")))


SERVICES = (
    Spec(
        name="flink-jobmanager",
        rank=90,
        url=flink_cluster.rest_url,
        health=flink_cluster.jobmanager_health,
        launch=_launch("jobmanager"),
        port_fields=lambda _s: ("flink_rest_port", "flink_rpc_port"),
        profiles=frozenset(),
        start_timeout=120.0,
        stop_grace=15.0,
    ),
    Spec(
        name="flink-taskmanager",
        rank=91,
        url=flink_cluster.rest_url,
        health=_taskmanager_health,
        launch=_launch("taskmanager"),
        port_fields=lambda _s: ("flink_taskmanager_port",),
        profiles=frozenset(),
        start_timeout=120.0,
        stop_grace=15.0,
    ),
)
