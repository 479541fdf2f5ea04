"""Pure feature assembly for serving: Redis hashes + request attributes -> one model row in
MODEL_FEATURES order, plus the names that were missing. No I/O here, so it is unit-tested alone
and the online path cannot drift from the order the model was trained with.

Session features are those valid strictly before the request's moment: its `event_time`, or
when the request carries none, its arrival time (UTC now), with the request's `event_id` breaking
ties at the same instant (easymlops.session_features.features_at)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from easymlops.features import (
    MODEL_FEATURES,
    PRODUCT_FEATURES,
    REQUEST_FEATURES,
    SESSION_FEATURES,
    USER_FEATURES,
    product_key,
    session_key,
    user_key,
)
from easymlops.session_features import features_at

# Redis returns str when the client decodes responses, bytes otherwise; accept both.
RedisHash = Mapping[str, str] | Mapping[bytes, bytes] | Mapping[str, str | bytes]
# One feature family's values: a Redis hash as read, or values derived from one (session).
FeatureSource = RedisHash | Mapping[str, float]


@dataclass(frozen=True, slots=True)
class FeatureRow:
    """One row of model input: `values[i]` is MODEL_FEATURES[i], NaN where missing."""

    values: tuple[float, ...]
    missing: tuple[str, ...]


def redis_keys(user_id: int, product_id: int, user_session: str) -> tuple[str, str, str]:
    """The three hashes one prediction reads, in the order `assemble_row` expects them."""
    return user_key(user_id), product_key(product_id), session_key(user_session)


def _number(raw: object) -> float | None:
    """A finite float from a Redis value, or None: a value that does not parse (or is NaN/inf)
    is treated as missing rather than failing the request, because a bad write to the online
    store must degrade one feature, not the service."""
    if raw is None:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode("utf-8", "replace")
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _decode(hash_: FeatureSource) -> dict[str, object]:
    return {
        (k.decode("utf-8", "replace") if isinstance(k, bytes) else k): v for k, v in hash_.items()
    }


def session_features(
    stored: RedisHash, product_id: int, at: datetime, event_id: str | None = None
) -> dict[str, float]:
    """The session features of a cart of `product_id` at `at` (id `event_id` if known) from the
    session's stored events (easymlops.session_features: the stream writes them, `features_at`
    keeps only those strictly before the cart); a session with no stored event has seen none
    yet, which the offline definition counts as zeros too."""
    decoded = {
        k: v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)
        for k, v in _decode(stored).items()
    }
    return features_at(decoded, product_id, at, event_id)


def feature_values(row: FeatureRow) -> dict[str, float | None]:
    """A row as name -> value in MODEL_FEATURES order, None where missing (what serving reports
    with debug features on)."""
    missing = set(row.missing)
    return {
        name: None if name in missing else value
        for name, value in zip(MODEL_FEATURES, row.values, strict=True)
    }


def assemble_row(
    request: Mapping[str, float | int | None],
    user: RedisHash,
    product: RedisHash,
    session: FeatureSource,
) -> FeatureRow:
    """Merge request attributes and the three Redis hashes into MODEL_FEATURES order.

    Each family is looked up only in its own source (a `price` field in a Redis hash cannot
    override the request's price); unknown fields in a hash are ignored so the online store can
    carry extra columns ahead of the model.
    """
    sources: dict[str, Mapping[str, object]] = {}
    for names, source in (
        (REQUEST_FEATURES, dict(request)),
        (USER_FEATURES, _decode(user)),
        (PRODUCT_FEATURES, _decode(product)),
        (SESSION_FEATURES, _decode(session)),
    ):
        for name in names:
            sources[name] = source
    values: list[float] = []
    missing: list[str] = []
    for name in MODEL_FEATURES:
        value = _number(sources[name].get(name))
        if value is None:
            missing.append(name)
            values.append(math.nan)
        else:
            values.append(value)
    return FeatureRow(values=tuple(values), missing=tuple(missing))


def to_matrix(rows: Sequence[FeatureRow]) -> np.ndarray:
    """Stack rows into the float32 matrix XGBoost takes (NaN = missing)."""
    if not rows:
        return np.empty((0, len(MODEL_FEATURES)), dtype=np.float32)
    return np.asarray([row.values for row in rows], dtype=np.float32)
