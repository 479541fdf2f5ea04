"""The code location's configuration as Dagster resources: what assets, checks, sensors and
schedules read instead of a process-wide settings call.

easymlops.settings.Settings stays the one definition of every setting, its default and its
EASYMLOPS_* variable. A resource field here is named after a Settings field and is an override:
None (the default) leaves the value to Settings (the run's environment, then its default), so
no default is copied here. `from_environment` wires each field whose variable the deployment
sets as `dg.EnvVar`: resolved when a run uses the resource and shown by name, never by value, in
the UI, so a deployment changes configuration without code, and a run's launchpad may override
any field.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from datetime import date
from typing import Any, TypeVar

import dagster as dg
import polars as pl

from easymlops import warehouse
from easymlops.settings import Settings


class _Overrides(dg.ConfigurableResource):
    """Fields named after Settings fields; set ones override Settings (strings: Settings
    validates and converts them, as it does the environment's)."""

    def overrides(self) -> dict[str, Any]:
        return {
            name: value
            for name in type(self).settings_fields()
            if (value := getattr(self, name)) is not None
        }

    @classmethod
    def settings_fields(cls) -> list[str]:
        return [name for name in cls.model_fields if name in Settings.model_fields]


class PlatformConfig(_Overrides):
    """Where the platform's parts are: the settings a deployment changes. Everything else (model
    name, tuning budget, gate thresholds...) is read by Settings from the run's environment."""

    home: str | None = None
    host: str | None = None
    lake_uri: str | None = None
    kafka_bootstrap: str | None = None
    redis_url: str | None = None
    mlflow_tracking_uri: str | None = None
    ray_address: str | None = None
    alert_webhook_url: str | None = None

    def settings(self) -> Settings:
        """The settings for library calls: the environment's, these fields on top."""
        return Settings(**self.overrides())


class Warehouse(_Overrides):
    """The warehouse dbt builds gold into and training and the online store read: DuckDB (a
    file) or PostgreSQL, by `warehouse_backend`. Its `settings()` are the platform's with the
    warehouse's fields on top: what assets that read the warehouse pass to the library."""

    platform: PlatformConfig
    warehouse_backend: str | None = None  # "duckdb" | "postgres" (Settings validates)
    warehouse_path: str | None = None
    pg_host: str | None = None
    pg_port: str | None = None
    pg_user: str | None = None
    pg_password: str | None = None
    pg_dbname: str | None = None
    pg_schema: str | None = None

    def settings(self) -> Settings:
        return Settings(**self.platform.overrides(), **self.overrides())

    @property
    def backend(self) -> str:
        return self.settings().warehouse_backend

    @property
    def dbt_target(self) -> str:
        return warehouse.dbt_target(self.settings())

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return warehouse.query(self.settings(), sql, params)

    def query_frame(self, sql: str, params: Sequence[Any] = ()) -> pl.DataFrame:
        return warehouse.query_frame(self.settings(), sql, params)

    def load_silver(self, first: date, end: date) -> int | None:
        """On PostgreSQL: silver's dates [first, end) into the table dbt reads (idempotent per
        date); returns the rows loaded. On DuckDB nothing to do (dbt reads the files): None."""
        settings = self.settings()
        if settings.warehouse_backend != "postgres":
            return None
        return warehouse.load_silver(settings, first, end)


R = TypeVar("R", bound=_Overrides)


def from_environment(cls: type[R], **nested: Any) -> R:
    """`cls` with each Settings field whose EASYMLOPS_* variable is set wired as `dg.EnvVar`.
    Only the presence of a variable is looked at here (when the definitions load, not at
    import): an EnvVar of an unset variable would fail every run, and an unset one means the
    Settings default."""
    prefix = str(Settings.model_config.get("env_prefix", ""))
    values: dict[str, Any] = {
        name: dg.EnvVar(variable)
        for name in cls.settings_fields()
        if (variable := f"{prefix}{name}".upper()) in os.environ
    }
    return cls(**nested, **values)


def platform_resources() -> dict[str, dg.ConfigurableResource]:
    """The resources under their keys, configured from the environment: for the definitions and
    for tests that run assets, sensors or schedules one by one."""
    platform = from_environment(PlatformConfig)
    return {"platform": platform, "warehouse": from_environment(Warehouse, platform=platform)}
