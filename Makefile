# EasyMLOps: `make demo` and `make test` are all a newcomer needs (see README.md).
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
# uv from PATH, or installed from PyPI into the user's Python when missing.
UV := $(shell command -v uv 2>/dev/null || echo "$(PYTHON) -m uv")
RUN := $(UV) run --frozen
export DAGSTER_HOME ?= $(CURDIR)/.easymlops/dagster
# Under `uv run`, Ray would ship this directory to its workers and build a 1.7 GB virtualenv per
# code snapshot; the workers use the same .venv anyway.
export RAY_ENABLE_UV_RUN_RUNTIME_ENV := 0

.PHONY: help uv install manifest demo demo-fresh test test-fast lint format dev up up-kafka up-production-local down status clean bench-serving bench-serving-variants bench-validation bench-validation-profile bench-lakehouse bench-tune bench-dagster bench bench-readme oracle-bound
.PHONY: flink-venv flink-validate flink-cluster flink-submit flink-stop backfill wrk soak-serving stall-serving nginx serve-nginx jars kcat vegeta compose-schema promtool k8s-schemas

help: ## list targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-16s %s\n", $$1, $$2}'

uv:
	@command -v uv >/dev/null 2>&1 || $(PYTHON) -m uv --version >/dev/null 2>&1 || \
		$(PYTHON) -m pip install --quiet --disable-pip-version-check uv 2>/dev/null || \
		$(PYTHON) -m pip install --quiet --disable-pip-version-check --user --break-system-packages uv

# --compile-bytecode: the .pyc files are written once here. Python writes them on first import
# otherwise, except where PYTHONDONTWRITEBYTECODE is set (CI images, some shells): there every
# process (each Dagster run, dbt, Ray worker) compiled its imports again, ~4 s of CPU per
# code-location load. Later syncs only check them (~3 s).
# native/ (the validator's compiled fast path) is built from source by uv with maturin: it needs
# Rust's cargo, said up front rather than deep in a build log.
install: uv ## create .venv from uv.lock (Python 3.11; builds native/ with cargo)
	@command -v cargo >/dev/null 2>&1 || [ -x "$$HOME/.cargo/bin/cargo" ] || { \
	  echo "make install: native/ (the validator's compiled fast path) needs Rust's cargo; install it with https://rustup.rs"; exit 1; }
	PATH="$$PATH:$$HOME/.cargo/bin" $(UV) sync --frozen --compile-bytecode

manifest: install ## dbt parse (Dagster builds the dbt assets from its manifest) + Dagster instance
	$(RUN) easymlops prepare

demo: manifest ## start the embedded stack and run everything end to end
	$(RUN) easymlops demo

demo-fresh: ## the demo from a clean slate: stop the stack, delete its data, then `make demo`
	$(MAKE) clean
	$(MAKE) demo

lint: install ## ruff (lint + format check) and mypy
	$(RUN) ruff check .
	$(RUN) ruff format --check .
	$(RUN) mypy

format: install
	$(RUN) ruff format .
	$(RUN) ruff check --fix .

test: manifest lint flink-venv nginx jars kcat compose-schema promtool k8s-schemas ## lint, then every test tier on real services on loopback
	$(RUN) dg check defs
	$(RUN) pytest -q -ra

test-fast: manifest flink-venv ## tests that need no running services
	$(RUN) pytest -q -ra -m "not services and not e2e"

dev: manifest ## Dagster UI on http://127.0.0.1:13000 (stack must be up for runs: make up)
	$(RUN) dagster dev -w workspace.yaml -h 127.0.0.1 -p 13000

# The Dagster CLI runs a date range of daily partitions as one run (single-run backfill policy).
BACKFILL_SELECT ?= silver_events,group:warehouse
backfill: manifest ## silver + gold for a date range: make backfill FROM=2026-11-20 TO=2026-11-22
	@[[ -n "$(FROM)" && -n "$(TO)" ]] || { echo "usage: make backfill FROM=YYYY-MM-DD TO=YYYY-MM-DD"; exit 2; }
	$(RUN) dagster asset materialize -m easymlops_assets.definitions \
		--select '$(BACKFILL_SELECT)' --partition-range '$(FROM)...$(TO)'

up: install ## start the embedded stack
	$(RUN) easymlops up

up-kafka: install jars ## the embedded stack with Apache Kafka instead of Tansu
	EASYMLOPS_BROKER=kafka $(RUN) easymlops up

up-production-local: install jars ## Apache Kafka, PostgreSQL, S3, MLflow on PostgreSQL + S3, Redis, Ray, Dagster (code server, webserver on 127.0.0.1:13000, daemon)
	$(RUN) easymlops up --profile production-local

down: install ## stop whatever `easymlops up` started (any profile)
	$(RUN) easymlops down

status: install
	$(RUN) easymlops status

clean: down ## stop the stack and delete its data
	rm -rf .easymlops dbt_project/target dbt_project/logs

# Debian packages: wrk loads the serving benchmark from its own process.
wrk:
	@infra/debian/install.sh wrk wrk

# kcat: the independent Kafka client the broker tests read Apache Kafka with.
kcat:
	@infra/debian/install.sh kcat kcat

# promtool (Debian's prometheus package): the alert rules' tests (tests/test_alert_rules.py).
promtool:
	@infra/debian/install.sh promtool prometheus

# nginx in front of Ray Serve (infra/nginx/); nginx-light has every module its config uses.
nginx:
	@infra/debian/install.sh nginx nginx-light

# The compose-spec JSON schema docker-compose.yml is validated against (tests/test_infra.py):
# the schema compose-go itself loads, from its module zip on the Go module proxy, checked
# against the sha256 below (move both together).
COMPOSE_GO_VERSION := v2.17.0
COMPOSE_GO_SHA256 := 3af3c020ea6875a44c6663755650439aa4749cf3f036095e23c115e25ba6051e
COMPOSE_SCHEMA := .tools/compose-spec-$(COMPOSE_GO_VERSION).json
comma := ,
GOPROXY_URL := $(firstword $(subst $(comma), ,$(shell go env GOPROXY 2>/dev/null || echo https://proxy.golang.org)))
compose-schema: $(COMPOSE_SCHEMA)

$(COMPOSE_SCHEMA):
	mkdir -p .tools
	curl -fsSL --retry 3 -o .tools/compose-go.zip \
	  "$(GOPROXY_URL)/github.com/compose-spec/compose-go/v2/@v/$(COMPOSE_GO_VERSION).zip"
	echo "$(COMPOSE_GO_SHA256)  .tools/compose-go.zip" | sha256sum -c --quiet -
	$(PYTHON) -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
	  .tools/compose-go.zip "github.com/compose-spec/compose-go/v2@$(COMPOSE_GO_VERSION)/schema/compose-spec.json" > $@.tmp
	mv $@.tmp $@
	rm .tools/compose-go.zip

# The JSON schemas infra/k8s/'s custom resources are validated against (tests/
# test_k8s_manifests.py), derived from each operator's own CRDs into .tools/k8s-schemas/: KubeRay's
# from its Go module zip (config/crd/bases), the Flink operator's from the CRDs its api jar
# carries, Strimzi's written by Strimzi's crd-generator from its api model, with the arguments of
# Strimzi's own build (the jars: infra/maven/k8s-crds/pom.xml). Every download is checked against
# the sha256 below (move versions and sums together). Built-in kinds need nothing here: the
# kubernetes-validate dev dependency bundles Kubernetes' schemas.
KUBERAY_VERSION := v1.5.0
KUBERAY_SHA256 := 59792cf6d32ecb6512403a4a470c2d2100ba81ab7583dcf4db4a3f0d6df5fab9
FLINK_OPERATOR_VERSION := 1.10.0
FLINK_OPERATOR_SHA256 := b1f44814e17514fa8395c61b329a3ee9087123a5bda5b21fe1a495d5182c30b6
STRIMZI_VERSION := 0.45.0
STRIMZI_API_SHA256 := 7112a02ebf29d38b2eb2ad8da90353d2a3922aea2fe2bddc2abe4e5956fdfe9a
STRIMZI_CRDGEN_SHA256 := f03aab1b83d29bbd340ce484a4bb651faac7685c685865a30351a636da6008ea
K8S_CRDS := .tools/k8s-crds
K8S_SCHEMAS_STAMP := .tools/k8s-schemas/.derived
CRD_JARS := infra/maven/k8s-crds/target
k8s-schemas: $(K8S_SCHEMAS_STAMP) ## operator CRD schemas for the infra/k8s/ tests, into .tools/k8s-schemas

$(K8S_SCHEMAS_STAMP): infra/maven/k8s-crds/pom.xml
	@infra/debian/install.sh java openjdk-17-jre-headless mvn maven
	rm -rf $(K8S_CRDS) .tools/k8s-schemas $(CRD_JARS)
	mkdir -p $(K8S_CRDS)
	curl -fsSL --retry 3 -o .tools/kuberay.zip \
	  "$(GOPROXY_URL)/github.com/ray-project/kuberay/ray-operator/@v/$(KUBERAY_VERSION).zip"
	echo "$(KUBERAY_SHA256)  .tools/kuberay.zip" | sha256sum -c --quiet -
	$(PYTHON) -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
	  .tools/kuberay.zip "github.com/ray-project/kuberay/ray-operator@$(KUBERAY_VERSION)/config/crd/bases/ray.io_rayservices.yaml" \
	  > $(K8S_CRDS)/ray.io_rayservices.yaml
	rm .tools/kuberay.zip
	mvn -q -B -Dstyle.color=never -f infra/maven/k8s-crds/pom.xml package
	echo "$(FLINK_OPERATOR_SHA256)  $(CRD_JARS)/flink-operator/flink-kubernetes-operator-api-$(FLINK_OPERATOR_VERSION).jar" | sha256sum -c --quiet -
	echo "$(STRIMZI_API_SHA256)  $(CRD_JARS)/strimzi/api-$(STRIMZI_VERSION).jar" | sha256sum -c --quiet -
	echo "$(STRIMZI_CRDGEN_SHA256)  $(CRD_JARS)/strimzi/crd-generator-$(STRIMZI_VERSION).jar" | sha256sum -c --quiet -
	$(PYTHON) -c 'import sys, zipfile; sys.stdout.buffer.write(zipfile.ZipFile(sys.argv[1]).read(sys.argv[2]))' \
	  $(CRD_JARS)/flink-operator/flink-kubernetes-operator-api-$(FLINK_OPERATOR_VERSION).jar \
	  META-INF/fabric8/flinkdeployments.flink.apache.org-v1.yml > $(K8S_CRDS)/flinkdeployments.flink.apache.org.yml
	java -cp '$(CRD_JARS)/strimzi/*' io.strimzi.crdgenerator.CrdGenerator \
	  --label app:strimzi --label strimzi.io/crd-install:true --target-kube 1.16+ \
	  --crd-api-version v1 --api-versions v1beta2 --storage-version v1beta2 --yaml \
	  io.strimzi.api.kafka.model.kafka.Kafka=$(K8S_CRDS)/040-Crd-kafka.yaml \
	  io.strimzi.api.kafka.model.topic.KafkaTopic=$(K8S_CRDS)/043-Crd-kafkatopic.yaml \
	  io.strimzi.api.kafka.model.nodepool.KafkaNodePool=$(K8S_CRDS)/045-Crd-kafkanodepool.yaml
	$(RUN) python -m easymlops.k8s_manifests schemas $(K8S_CRDS) .tools/k8s-schemas.tmp
	mv .tools/k8s-schemas.tmp .tools/k8s-schemas
	touch $@

# JVM artifacts from Maven Central, declared once in infra/maven/pom.xml: the Apache Kafka broker
# (EASYMLOPS_BROKER=kafka) and the Flink Kafka connector. Java 17 and Maven from Debian if missing.
JARS_STAMP := infra/maven/target/.fetched
jars: $(JARS_STAMP) ## fetch the Apache Kafka broker and the Flink Kafka connector into infra/maven/target

$(JARS_STAMP): infra/maven/pom.xml
	@infra/debian/install.sh java openjdk-17-jre-headless mvn maven
	rm -rf infra/maven/target
	mvn -q -B -Dstyle.color=never -f infra/maven/pom.xml package
	touch $@

serve-nginx: install nginx ## the stack plus NGINX in front of Ray Serve on 127.0.0.1:18080
	$(RUN) easymlops up --with-nginx

bench-serving: install wrk nginx ## Ray Serve vs a bare uvicorn server of the same app, c=1/8/32 (after `make demo`)
	$(RUN) python benchmarks/serving.py

bench-serving-variants: install wrk ## @serve.batch and 2 replicas vs the demo's app, c=1/8/32 (after `make demo`)
	$(RUN) python benchmarks/serving.py --variants

# vegeta (Go module proxy) into .tools/: the open-loop, constant-rate load of soak-serving.
VEGETA := .tools/vegeta
vegeta: $(VEGETA)
$(VEGETA):
	@command -v go >/dev/null || { echo "soak-serving needs Go to install vegeta (https://go.dev/dl)" >&2; exit 1; }
	GOBIN=$(CURDIR)/.tools go install github.com/tsenart/vegeta/v12@v12.13.0

soak-serving: install wrk vegeta ## 10 minutes at half the measured peak: errors and p99 vs a short run (after `make demo`)
	$(RUN) python benchmarks/serving.py --soak 600

stall-serving: install wrk vegeta ## the soak's load with the replica stopped for 3 s: the backlog and its recovery (after `make demo`)
	$(RUN) python benchmarks/serving.py --stall 3

bench-validation: install flink-venv jars ## validator events/s vs a transactional passthrough, on Tansu, then on Kafka + Flink
	$(RUN) python benchmarks/validation.py
	$(RUN) python benchmarks/validation.py --broker kafka --no-flink

bench-validation-profile: install ## CPU per event of each part of the validator (threads, broker, Redis) and the cores it keeps busy
	$(RUN) python benchmarks/validation_profile.py

bench-lakehouse: install ## bronze -> silver -> gold rows/s and peak memory vs pandas (10M events); the project alone at 40M: EVENTS=40000000 PROJECT_ONLY=1
	$(RUN) python benchmarks/lakehouse.py $(if $(EVENTS),--events $(EVENTS)) $(if $(PROJECT_ONLY),--project-only)

bench-monitoring: install ## batch scoring and prediction logging vs their floors (needs `make demo`)
	$(RUN) python benchmarks/monitoring.py

bench-tune: install ## Ray Tune search (concurrent trials, ASHA) vs the same trials run sequentially
	$(RUN) python benchmarks/tune.py

oracle-bound: install ## the oracle, the best score the demo's history allows (history oracle) and the champion, on the held-out carts (needs `make demo`)
	$(RUN) python -m easymlops.history_oracle

gate-by-date: manifest ## how often a model of the demo's data clears the promotion gate, over 12 consecutive first days (no stack needed; e2e tests' data: ARGS="--events 20000 --days 5 --seed 11 --first 2026-11-10 --count 20")
	$(RUN) python benchmarks/gate_by_date.py $(ARGS)

bench-dagster: manifest ## code-location load, a no-op run and a one-date backfill of 1,000 events, per executor (needs `make up`)
	$(RUN) python benchmarks/dagster_runs.py

# Quick mode, each benchmark in its own process. Serving, monitoring and dagster_runs measure the
# demo's stack and model: run `make demo` first, or they are recorded as skipped.
bench: manifest wrk nginx ## every benchmark in quick mode -> benchmarks/results/<UTC date>.json (after `make demo`)
	$(RUN) python benchmarks/run_all.py

bench-readme: install ## README.md's generated "Measured" table from the newest benchmarks/results file
	$(RUN) python benchmarks/report.py readme

# PyFlink's own virtualenv (apache-flink pins old pandas/pyarrow/beam; see flink_jobs/README.md).
FLINK_VENV := .flink-venv
FLINK_PYTHON := $(FLINK_VENV)/bin/python

flink-venv: $(FLINK_VENV)/.installed ## PyFlink virtualenv in .flink-venv (for the Flink job and its tests)

$(FLINK_VENV)/.installed: flink_jobs/requirements.txt | uv
	$(UV) venv --allow-existing --python 3.11 $(FLINK_VENV)
	$(UV) pip install --python $(FLINK_PYTHON) -r flink_jobs/requirements.txt
	touch $@

flink-cluster: install flink-venv jars ## the stack on Apache Kafka plus a standalone Flink cluster (web UI on 127.0.0.1:18081)
	EASYMLOPS_BROKER=kafka $(RUN) easymlops up --with-flink

flink-submit: install ## the validation job on that cluster, Kafka mode, exactly once (after `make flink-cluster`)
	EASYMLOPS_BROKER=kafka $(RUN) easymlops flink submit

flink-stop: install ## stop the job with a savepoint; resume: easymlops flink submit --from-savepoint <path>
	EASYMLOPS_BROKER=kafka $(RUN) easymlops flink stop

flink-validate: flink-venv ## Flink job, bounded: make flink-validate INPUT=events.jsonl OUTPUT=dir
	@test -n "$(INPUT)" || { echo "usage: make flink-validate INPUT=<file.jsonl> OUTPUT=<dir> (INPUT is missing)" >&2; exit 2; }
	@test -n "$(OUTPUT)" || { echo "usage: make flink-validate INPUT=<file.jsonl> OUTPUT=<dir> (OUTPUT is missing)" >&2; exit 2; }
	PYTHONPATH=$(CURDIR) $(FLINK_PYTHON) -m flink_jobs.validation_job bounded --input "$(INPUT)" --output "$(OUTPUT)"
