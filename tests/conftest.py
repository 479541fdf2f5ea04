"""Shared fixtures: one embedded stack (broker, Redis, MLflow, Ray) per test session, on free
loopback ports and in a temporary home, so a developer's running `easymlops up` is untouched."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from easymlops.settings import Settings, get_settings


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def stack_env(home: Path) -> dict[str, str]:
    """EASYMLOPS_* variables for an isolated stack rooted at `home`."""
    return {
        "EASYMLOPS_HOME": str(home),
        "EASYMLOPS_KAFKA_PORT": str(free_port()),
        "EASYMLOPS_REDIS_PORT": str(free_port()),
        "EASYMLOPS_MLFLOW_PORT": str(free_port()),
        "EASYMLOPS_RAY_PORT": str(free_port()),
        "EASYMLOPS_RAY_DASHBOARD_PORT": str(free_port()),
        "EASYMLOPS_SERVE_PORT": str(free_port()),
        "EASYMLOPS_DAGSTER_PORT": str(free_port()),
    }


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """The embedded stack, up for the whole session; its settings are exported to the
    environment so subprocesses (CLI, dagster, dbt) see the same stack."""
    from easymlops import stack as stack_module

    home = tmp_path_factory.mktemp("easymlops-home")
    env = stack_env(home)
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_settings.cache_clear()
    settings = get_settings()
    stack_module.up(settings)
    try:
        yield settings
    finally:
        # Detach this process from the head first (tests that deploy to Serve attach to it):
        # a driver whose head is gone waits 60 s at exit for it, then aborts the whole process
        # with exit code 1, after every test passed.
        import ray

        if ray.is_initialized():
            ray.shutdown()
        stack_module.down(settings)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()
