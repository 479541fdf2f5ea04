"""The online store: user and product features valid today, in Redis for serving."""

from datetime import date

import dagster as dg

from easymlops import features, online_store
from easymlops_assets.resources import Warehouse


class OnlineFeaturesConfig(dg.Config):
    """`as_of`: the day (YYYY-MM-DD) whose features are served; empty means today (UTC). A past
    day serves what the training set joined for that day's carts (parity checks, replays)."""

    as_of: str = ""


@dg.asset(deps=["user_features", "product_features"], group_name="features", kinds={"redis"})
def online_features(config: OnlineFeaturesConfig, warehouse: Warehouse) -> dg.MaterializeResult:
    """Each user's and product's feature row valid on the as-of day, by default today (history
    of the days before it, as the training set joins it), as Redis hashes `feat:user:{id}` and
    `feat:product:{id}`, with the feature-set version, as-of day and time in `feat:meta`."""
    as_of = date.fromisoformat(config.as_of) if config.as_of else None
    result = online_store.materialize(warehouse.settings(), as_of=as_of)
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
def online_features_match_warehouse(warehouse: Warehouse) -> dg.AssetCheckResult:
    """Online/offline consistency: every user and product hash in Redis equals the features the
    training set's point-in-time join gives that entity on the materialization's as-of day (the
    as-of query where the training set has no carts of that day), nulls included: a feature
    the warehouse does not know must be absent online."""
    settings = warehouse.settings()
    as_of = online_store.materialized_as_of(settings)
    if as_of is None:
        return dg.AssetCheckResult(passed=False, description="feat:meta has no as_of in Redis")
    source, users, products, mismatches = online_store.compare_with_warehouse(settings, as_of)
    return dg.AssetCheckResult(
        passed=users > 0 and not mismatches,
        description=f"{users} users and {products} products as of {as_of} against the "
        f"{source}: {len(mismatches)} mismatches",
        metadata={
            "as_of": str(as_of),
            "compared_with": source,
            "users": users,
            "products": products,
            "mismatches": dg.MetadataValue.json(mismatches[:20]),
        },
    )
