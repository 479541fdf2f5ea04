"""Static checks of the Flink deployment files (infra/flink/): no Docker engine and no Maven
Central on this project's machines, so the image is never built here. The job itself runs in
tests/test_flink.py."""

from __future__ import annotations

import re
from pathlib import Path

from easymlops.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "infra" / "flink" / "Dockerfile"
README = ROOT / "infra" / "flink" / "README.md"
REQUIREMENTS = ROOT / "flink_jobs" / "requirements.txt"
POM = ROOT / "infra" / "maven" / "pom.xml"


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE.read_text(), flags=re.MULTILINE))


def pinned(package: str) -> str:
    match = re.search(rf"^{package}==(\S+)$", REQUIREMENTS.read_text(), flags=re.MULTILINE)
    assert match, f"{package} is not pinned in {REQUIREMENTS}"
    return match.group(1)


def test_image_runs_the_flink_release_of_the_pyflink_client() -> None:
    text = DOCKERFILE.read_text()
    assert dockerfile_args()["FLINK_VERSION"] == pinned("apache-flink")
    assert re.search(r"^FROM flink:\$\{FLINK_VERSION\}-scala_2\.12-java17$", text, re.MULTILINE)
    assert "--python 3.11" in text
    assert "-r /opt/easymlops/flink_jobs/requirements.txt" in text


def pom_property(name: str) -> str:
    match = re.search(rf"<{re.escape(name)}>([^<]+)</{re.escape(name)}>", POM.read_text())
    assert match, f"{POM} has no property {name}"
    return match.group(1)


def test_kafka_connector_is_downloaded_from_maven_central_and_checked() -> None:
    text = DOCKERFILE.read_text()
    args = dockerfile_args()
    # One connector version: the image's and the one `make jars` fetches for the tests.
    assert args["KAFKA_CONNECTOR_VERSION"] == pom_property("flink.kafka.connector.version")
    # Externalized connector versions end with the Flink line they are built for ("-2.2"), which
    # must be the line of the PyFlink pin (the reason it is 2.2.x: flink_jobs/README.md).
    flink_line = ".".join(pinned("apache-flink").split(".")[:2])
    assert re.fullmatch(rf"\d+\.\d+\.\d+-{re.escape(flink_line)}", args["KAFKA_CONNECTOR_VERSION"])
    assert args["MAVEN_REPOSITORY"] == "https://repo.maven.apache.org/maven2"
    assert "/org/apache/flink/flink-sql-connector-kafka/${KAFKA_CONNECTOR_VERSION}/" in text
    assert "/opt/flink/lib/" in text
    assert "sha1sum -c -" in text
    assert "sha256sum -c -" in text


def test_every_copied_path_exists() -> None:
    copies = re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) \S+$", DOCKERFILE.read_text(), re.M)
    assert copies
    for source in copies:
        assert (ROOT / source).exists(), source
    assert {"easymlops", "flink_jobs"} <= set(copies)


def test_readme_documents_the_real_job_and_settings() -> None:
    text = README.read_text()
    # The submission docker-compose.yml's flink-job runs, with the job's own arguments.
    assert "--python /opt/easymlops/flink_jobs/validation_job.py" in text
    assert re.search(r"flink_jobs/validation_job\.py[^\n]*\n?\s*kafka\b", text)
    assert (ROOT / "flink_jobs" / "validation_job.py").exists()
    fields = {f"EASYMLOPS_{name.upper()}" for name in Settings.model_fields}
    documented = set(re.findall(r"EASYMLOPS_[A-Z_]+", text))
    assert documented and documented <= fields, documented - fields
    assert "flink-python-" + dockerfile_args()["FLINK_VERSION"] + ".jar" in text


def test_flink_venv_is_git_ignored() -> None:
    assert ".flink-venv/" in (ROOT / ".gitignore").read_text().splitlines()
