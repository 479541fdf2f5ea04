"""The online store: user and product features valid today, in Redis for serving."""

import dagster as dg

from easymlops import features, online_store
from easymlops.settings import get_settings


@dg.asset(deps=["user_features", "product_features"], group_name="features", kinds={"redis"})
def online_features() -> dg.MaterializeResult:
    """Each user's and product's feature row valid today (history of the days before today, as
    the training set joins it), as Redis hashes `feat:user:{id}` and `feat:product:{id}`, with
    the feature-set version, as-of day and time in `feat:meta`."""
    result = online_store.materialize(get_settings())
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": result.users + result.products,
            "users": result.users,
            "products": result.products,
            "as_of": result.as_of,
            "feature_set_version": features.FEATURE_SET_VERSION,
        }
    )


@dg.asset_check(asset=online_features, blocking=True)
def online_features_match_warehouse() -> dg.AssetCheckResult:
    """Online/offline consistency: a sample of users in Redis equals their warehouse row valid
    on the materialization's as-of day (the row the training set would join that day)."""
    settings = get_settings()
    as_of = online_store.materialized_as_of(settings)
    if as_of is None:
        return dg.AssetCheckResult(passed=False, description="feat:meta has no as_of in Redis")
    rows = online_store.rows_as_of(
        settings, "user_features", "user_id", features.USER_FEATURES, as_of
    )
    sample = rows[:: max(1, len(rows) // 50)]
    mismatches = []
    for row in sample:
        online = online_store.read_entity(settings, features.user_key(row[0]))
        for name, value in zip(features.USER_FEATURES, row[1:-1], strict=True):
            if value is None:
                continue
            if name not in online or abs(online[name] - float(value)) > 1e-9:
                mismatches.append(f"user {row[0]} {name}: redis {online.get(name)} != {value}")
    return dg.AssetCheckResult(
        passed=bool(sample) and not mismatches,
        metadata={
            "as_of": str(as_of),
            "sampled_users": len(sample),
            "mismatches": dg.MetadataValue.json(mismatches[:20]),
        },
    )
