"""Contract tests generated from the serving app's own OpenAPI spec (schemathesis): the app runs on
Ray Serve on the test stack with a promoted model and features in Redis, and no generated
request, valid or not, may get a 5xx; responses must match the spec the service publishes.

The schema is read from the running service's /openapi.json in a fixture, and each operation's
cases come from `APIOperation.as_strategy` under Hypothesis: schemathesis' pytest loader for a
schema from a fixture (`schemathesis.pytest.from_fixture`) breaks on pytest 9.2 (it sets the
removed `Node._nodeid`)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import ray
import redis
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import Case, CheckContext, GenerationMode, Response, checks
from schemathesis.schemas import BaseSchema

from easymlops import registry
from easymlops.features import product_key, user_key
from easymlops.settings import Settings
from tests.test_serving import PRODUCT, USER, tiny_booster

MODEL_NAME = "test_contract_model"
# Ids Hypothesis generates early and often (its smallest integers) have features in Redis, so
# some generated calls score a complete row, not only rows of missing features.
KNOWN_IDS = (0, 1)
PREDICT, BATCH, METRICS = "POST /predict", "POST /predict/batch", "GET /metrics"
# Every operation of the spec: test_spec_lists_every_operation fails on a new endpoint until it
# is added here, so generated cases cover it.
OPERATIONS = (PREDICT, BATCH, "GET /healthz", "GET /readyz", "GET /model", METRICS)
BODY_OPERATIONS = (PREDICT, BATCH)

# The one refusal the spec cannot declare: see _excused_refusal.
IDS = ("user_id", "product_id")


def _excused_refusal(error: dict[str, Any]) -> bool:
    """Whether a 422 on a case the spec calls valid is one the app refuses on purpose."""
    name, kind = error["field"].rsplit(".", 1)[-1], error["type"]
    # What JSON Schema cannot say: an instant outside years 1..9999 once converted to UTC
    # (easymlops.schema.parse_time); an id beyond int64, whose bounds the spec can only state
    # as floats (FastAPI's OpenAPI models write them as +-2**63), nor can it rule out an
    # integer written as a float too large for pydantic to convert.
    return name == "event_time" or (
        name in IDS and kind in ("greater_than_equal", "less_than_equal", "int_parsing_size")
    )


def accepted(ctx: CheckContext, response: Response, case: Case) -> bool | None:
    """positive_data_acceptance, but for the refusals _excused_refusal lists."""
    if response.status_code == 422 and all(map(_excused_refusal, response.json()["detail"])):
        return None
    return checks.positive_data_acceptance(ctx, response, case)


services = pytest.mark.services
# Bounded and reproducible: the same cases on every run (derandomize, no example database), a
# few minutes on 2 cores. Each example is an HTTP call through the Serve proxy, hence no
# deadline and no too_slow.
EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@pytest.fixture(scope="module")
def service_url(stack: Settings) -> Iterator[str]:
    """The app deployed by a separate process (as tests/test_serving.py does), with a promoted
    model, so /predict really scores and /readyz, /model answer 200."""
    settings_ = stack.model_copy(update={"model_name": MODEL_NAME})
    version = registry.log_and_register(tiny_booster(7), params={}, metrics={}, settings=settings_)
    registry.promote(version.version, settings_)
    store = redis.Redis.from_url(settings_.redis)
    keys = [key(i) for i in KNOWN_IDS for key in (user_key, product_key)]
    for i in KNOWN_IDS:
        store.hset(user_key(i), mapping=USER)
        store.hset(product_key(i), mapping=PRODUCT)

    connected_before = ray.is_initialized()
    script = (
        "from easymlops.settings import Settings; from serving.deploy import deploy; "
        "print(deploy(Settings(), poll_interval_s=2.0, timeout=240))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=os.environ | {"EASYMLOPS_MODEL_NAME": MODEL_NAME},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    url = done.stdout.strip().splitlines()[-1]
    try:
        yield url
    finally:
        from serving.deploy import undeploy

        undeploy(settings_)
        if not connected_before:
            ray.shutdown()
        store.delete(*keys)


@pytest.fixture(scope="module")
def api(service_url: str) -> BaseSchema:
    """The spec as the running service publishes it."""
    schema = schemathesis.openapi.from_url(f"{service_url}/openapi.json", timeout=10)
    # A failure prints the request as sent: schemathesis would mask `user_session` as a secret.
    schema.config.output.sanitization.update(enabled=False)
    return schema


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


def _operation(api: BaseSchema, label: str) -> Any:
    method, path = label.split(" ")
    return api[path][method]


def _response_schema(api: BaseSchema, label: str, status: str) -> dict[str, Any]:
    method, path = label.split(" ")
    response = api.raw_schema["paths"][path][method.lower()]["responses"][status]
    schema: dict[str, Any] = response["content"]["application/json"]["schema"]
    ref = schema.get("$ref", "")
    return api.raw_schema["components"]["schemas"][ref.rsplit("/", 1)[-1]] if ref else schema


@services
def test_spec_lists_every_operation(api: BaseSchema) -> None:
    assert {op.ok().label for op in api.get_all_operations()} == set(OPERATIONS)


@services
@pytest.mark.parametrize("label", OPERATIONS)
def test_valid_requests_keep_the_contract(
    api: BaseSchema, http: requests.Session, label: str
) -> None:
    """Requests the spec allows: never a 5xx (the model and Redis are up, so not even 503),
    accepted with a 2xx, and answered with the status, content type and body the spec
    declares."""

    @EXAMPLES
    @given(case=_operation(api, label).as_strategy(GenerationMode.POSITIVE))
    def keeps_contract(case: schemathesis.Case) -> None:
        case.call_and_validate(
            session=http,
            timeout=30,
            checks=[
                checks.not_a_server_error,
                checks.status_code_conformance,
                checks.content_type_conformance,
                checks.response_headers_conformance,
                checks.response_schema_conformance,
                accepted,
            ],
        )

    keeps_contract()


@services
@pytest.mark.parametrize("label", BODY_OPERATIONS)
def test_malformed_bodies_get_4xx(api: BaseSchema, http: requests.Session, label: str) -> None:
    """Bodies the spec forbids (wrong types, missing fields, out-of-range values, not JSON): a
    4xx naming the bad fields, never a 5xx."""

    @EXAMPLES
    @given(case=_operation(api, label).as_strategy(GenerationMode.NEGATIVE))
    def rejected(case: schemathesis.Case) -> None:
        response = case.call_and_validate(
            session=http,
            timeout=30,
            checks=[
                checks.not_a_server_error,
                checks.status_code_conformance,
                checks.content_type_conformance,
                checks.response_schema_conformance,
                checks.negative_data_rejection,
            ],
        )
        assert 400 <= response.status_code < 500, response.text
        if response.status_code == 422:  # the schema allows empty strings and lists
            body = response.json()
            assert body["detail"] and isinstance(body["message"], str), body
            assert all(e["field"] and e["reason"] for e in body["detail"]), body

    rejected()


# ---- what the spec declares, beyond what FastAPI writes by default ------------------------


@services
def test_spec_bounds_price_and_ids(api: BaseSchema) -> None:
    request = api.raw_schema["components"]["schemas"]["PredictRequest"]["properties"]
    assert request["price"].get("minimum") == 0
    for name in IDS:  # as floats: see _excused_refusal
        assert (request[name].get("minimum"), request[name].get("maximum")) == (-(2.0**63), 2.0**63)


@services
@pytest.mark.parametrize("label", BODY_OPERATIONS)
def test_spec_declares_the_422_body_the_app_sends(api: BaseSchema, label: str) -> None:
    assert "message" in _response_schema(api, label, "422")["properties"]


@services
def test_spec_declares_metrics_as_text(api: BaseSchema) -> None:
    content = api.raw_schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "text/plain" in content


@services
@pytest.mark.parametrize("label", BODY_OPERATIONS)
def test_body_not_utf8_is_a_422_naming_the_body(
    service_url: str, http: requests.Session, label: str
) -> None:
    path = label.split(" ")[1]
    response = http.post(
        service_url + path,
        data=b'{"user_session": "\xff"}',
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 422, response.text
    assert response.json()["detail"][0]["field"] == "body"
