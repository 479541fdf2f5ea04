"""The lake on S3 (`EASYMLOPS_LAKE_URI=s3://bucket/prefix`): filesystem access for silver and
DuckDB's httpfs setup. Endpoint and credentials come only from the standard AWS_* variables
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_REGION,
AWS_ALLOW_HTTP), which deltalake, polars and pyarrow read by themselves."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

# duckdb and pyarrow are imported by the functions that use them: the Dagster definitions import
# this module (through the lake), and each step process loads them.
if TYPE_CHECKING:
    import duckdb
    import pyarrow.fs as pafs

# httpfs reads s3:// paths; aws reads the S3 keys from the environment.
DUCKDB_EXTENSIONS = ("httpfs", "aws")


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem of a lake URI or local path, and the path inside it."""
    import pyarrow.fs as pafs

    if is_s3(uri):
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path
    return pafs.LocalFileSystem(), str(Path(uri).resolve())


def extension_path(name: str) -> str | None:
    """The file of DuckDB extension `name` ("httpfs", "aws") shipped by the
    `duckdb-extension-<name>` wheel for this DuckDB release: DuckDB cannot download extensions
    here, so they are loaded by path."""
    try:
        module = importlib.import_module(f"duckdb_extension_{name}")
    except ImportError:
        return None
    import duckdb

    path = (
        Path(module.__file__ or "").parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / f"{name}.duckdb_extension"
    )
    return str(path) if path.exists() else None


def duckdb_secret() -> dict[str, str]:
    """Options of DuckDB's S3 secret: the aws extension reads the keys from the AWS_* variables
    (credential chain `env`), so neither SQL nor dbt's logs ever hold a key."""
    options = {"type": "s3", "provider": "credential_chain", "chain": "env"}
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if endpoint:
        scheme, _, host = endpoint.rpartition("://")
        # DuckDB wants host[:port] and the scheme as use_ssl; an S3 API server of one's own
        # (MinIO, SeaweedFS) serves buckets as paths, not as subdomains.
        options |= {
            "endpoint": host.rstrip("/"),
            "url_style": "path",
            "use_ssl": "false" if scheme == "http" else "true",
        }
    if os.environ.get("AWS_REGION"):
        options["region"] = os.environ["AWS_REGION"]
    return options


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def duckdb_dbt_env() -> dict[str, str]:
    """What dbt_project/profiles.yml reads to let dbt-duckdb read an S3 lake: the extension
    files to load and the S3 secret's options (JSON)."""
    paths = [extension_path(name) for name in DUCKDB_EXTENSIONS]
    return {
        "EASYMLOPS_DUCKDB_EXTENSIONS": json.dumps([p for p in paths if p]),
        "EASYMLOPS_DUCKDB_S3_SECRET": json.dumps(duckdb_secret()),
    }


def enable_duckdb_s3(con: duckdb.DuckDBPyConnection) -> None:
    """Let `con` read s3:// paths (views over the S3 lake, read_parquet of silver)."""
    for name in DUCKDB_EXTENSIONS:
        path = extension_path(name)
        con.execute(f"LOAD {_quote(path)}" if path else f"LOAD {name}")
    options = ", ".join(
        f"{k} {v if k in ('type', 'provider') else _quote(v)}" for k, v in duckdb_secret().items()
    )
    con.execute(f"CREATE OR REPLACE TEMPORARY SECRET easymlops_lake ({options})")
