"""HTTP request and response bodies of the serving API (DESIGN.md section 5).

Extra fields in a request are ignored, not refused: a producer can post a whole cart event
(event_type, category_id, ...) as it is, and clients can add fields ahead of the
server. A misspelt optional field is therefore silently unused; every field the model needs
is required, so a misspelt required field still gets a 422.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from easymlops.schema import INT64_MAX, INT64_MIN, MAX_STRING_LENGTH, ValidationError, parse_time

MAX_BATCH = 1000


def _event_time(value: Any) -> Any:
    # Same accepted forms as the event stream (CSV `... UTC` and ISO-8601), one parser for both.
    if value is None or isinstance(value, datetime):
        return value
    try:
        return parse_time(value)
    except ValidationError as exc:
        raise ValueError(str(exc)) from None


def _no_bool(value: Any) -> Any:
    # JSON true/false would otherwise coerce to 1/0 and score a request nobody meant to send.
    if isinstance(value, bool):
        raise ValueError("must be a number, got a boolean")
    return value


EventTime = Annotated[datetime | None, BeforeValidator(_event_time)]
# Field before BeforeValidator: after it, pydantic leaves the bounds out of the JSON schema
# (they still apply), and the OpenAPI spec would call a negative price valid.
Int64 = Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), BeforeValidator(_no_bool)]
Price = Annotated[float, Field(ge=0, allow_inf_nan=False), BeforeValidator(_no_bool)]


class PredictRequest(BaseModel):
    """One cart event to score."""

    model_config = ConfigDict(extra="ignore")

    user_id: Int64
    product_id: Int64
    user_session: str = Field(min_length=1, max_length=MAX_STRING_LENGTH)
    price: Price
    # The cart's own time and id: session features count only the session's events strictly
    # before this cart (serving.features). Without event_time, the request's arrival time.
    event_time: EventTime = None
    event_id: str | None = Field(default=None, min_length=1, max_length=MAX_STRING_LENGTH)
    category_code: str | None = Field(default=None, max_length=MAX_STRING_LENGTH)
    brand: str | None = Field(default=None, max_length=MAX_STRING_LENGTH)

    def request_features(self) -> dict[str, float]:
        """The request attributes the model uses (features.REQUEST_FEATURES)."""
        return {"price": self.price}


class PredictResponse(BaseModel):
    # Key of this prediction's record in the predictions topic (joins it to its outcome later).
    request_id: str
    probability: float = Field(ge=0.0, le=1.0)
    model_name: str
    model_version: str
    missing_features: list[str]
    feature_set_version: str
    # Only with settings.serve_debug_features: every model feature's value, null where missing.
    features: dict[str, float | None] | None = None


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    requests: list[PredictRequest] = Field(min_length=1, max_length=MAX_BATCH)


class BatchResponse(BaseModel):
    predictions: list[PredictResponse]


class ModelInfo(BaseModel):
    name: str
    version: str
    run_id: str
    model_uri: str
    loaded_at: datetime
    feature_names: list[str]
    feature_set_version: str
    # Why the replica's last look at the champion alias failed (e.g. a new champion that cannot
    # be loaded: the replica keeps serving `version`), and versions it refused, with the reason.
    last_poll_error: str | None = None
    rejected_versions: dict[str, str] = {}


class Readiness(BaseModel):
    # "ready" or "not ready"; checks: model, redis, feature_set, each "ok..." or why not.
    status: str
    checks: dict[str, str]


class FieldError(BaseModel):
    # `requests[3].user_id`, or `body` for the body as a whole.
    field: str
    reason: str
    type: str
    loc: list[int | str]


class ValidationErrorBody(BaseModel):
    """The 422 body: each bad field and why, never the input itself."""

    detail: list[FieldError]
    message: str


class ErrorBody(BaseModel):
    """401, 413 and 503 bodies: what is wrong (the online store, the model, the key, the size)."""

    detail: str
