"""Create what the platform's services expect to exist before they start: the Kafka topics and
the S3 buckets. Idempotent, so it runs on every start of a deployment: docker-compose.yml's
`init` job (`python -m easymlops.provision --bucket mlflow ...`), an init container on
Kubernetes, or by hand against any stack.

The broker comes from the EASYMLOPS_* settings; S3 from the standard AWS_* variables
(AWS_ENDPOINT_URL for MinIO or SeaweedFS). The lake's bucket is added when EASYMLOPS_LAKE_URI
is an s3:// URI."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import urlparse

from easymlops.kafka import ensure_topics
from easymlops.s3 import is_s3
from easymlops.settings import Settings, get_settings

T = TypeVar("T")


class ProvisionError(RuntimeError):
    """A topic or bucket could not be created; the message names which and why."""


def lake_bucket(settings: Settings) -> str | None:
    return urlparse(settings.lake).netloc if is_s3(settings.lake) else None


def ensure_buckets(names: Sequence[str], client: Any | None = None) -> list[str]:
    """Create the buckets that do not exist yet; return the names created."""
    if client is None:
        import boto3  # only the S3 half needs it

        client = boto3.client("s3")  # endpoint and keys: AWS_* variables
    existing = {bucket["Name"] for bucket in client.list_buckets().get("Buckets", [])}
    created = []
    for name in dict.fromkeys(names):  # once each, in order
        if name not in existing:
            client.create_bucket(Bucket=name)
            created.append(name)
    return created


def _retrying(what: str, call: Callable[[], T], deadline: float, say: Callable[[str], None]) -> T:
    """`call()` until it succeeds or `deadline` (monotonic) passes: in a compose start the
    broker or the object store may still be coming up although its healthcheck passed once."""
    while True:
        try:
            return call()
        except Exception as exc:  # the cause is reported when the deadline passes
            if time.monotonic() >= deadline:
                raise ProvisionError(f"{what}: {type(exc).__name__}: {exc}") from exc
            say(f"{what}: not yet ({type(exc).__name__}); retrying")
            time.sleep(2.0)


def provision(
    settings: Settings,
    buckets: Sequence[str] = (),
    *,
    timeout: float = 120.0,
    say: Callable[[str], None] = print,
) -> dict[str, list[str]]:
    """Topics, then buckets (the given ones plus the lake's); returns what was created."""
    deadline = time.monotonic() + timeout
    topics = _retrying(
        f"create topics on {settings.bootstrap_servers}",
        lambda: ensure_topics(settings),
        deadline,
        say,
    )
    wanted = [*buckets, *filter(None, [lake_bucket(settings)])]
    created_buckets = (
        _retrying("create buckets", lambda: ensure_buckets(wanted), deadline, say) if wanted else []
    )
    return {"topics": topics, "buckets": created_buckets}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m easymlops.provision", description=__doc__)
    parser.add_argument(
        "--bucket", action="append", default=[], help="an S3 bucket to create (repeatable)"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds to keep retrying")
    args = parser.parse_args(argv)
    settings = get_settings()
    try:
        created = provision(settings, args.bucket, timeout=args.timeout)
    except ProvisionError as exc:
        raise SystemExit(f"provision failed: {exc}") from None
    for kind, names in created.items():
        print(f"{kind}: created {', '.join(names)}" if names else f"{kind}: all present")


if __name__ == "__main__":
    main()
