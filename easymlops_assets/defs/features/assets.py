"""The online store: the latest user and product features, in Redis for serving."""

import dagster as dg

from easymlops import features, online_store, warehouse
from easymlops.settings import get_settings


@dg.asset(deps=["user_features", "product_features"], group_name="features", kinds={"redis"})
def online_features() -> dg.MaterializeResult:
    """Each user's and product's newest feature row, as Redis hashes `feat:user:{id}` and
    `feat:product:{id}`, with the feature-set version and time in `feat:meta`."""
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
    """Online/offline consistency: a sample of users in Redis equals their newest warehouse row."""
    settings = get_settings()
    columns = ", ".join(features.USER_FEATURES)
    with warehouse.connect(settings) as con:
        rows = con.execute(
            f"""select user_id, {columns} from user_features
            where valid_to is null order by hash(user_id) limit 50"""
        ).fetchall()
    mismatches = []
    for row in rows:
        online = online_store.read_entity(settings, features.user_key(row[0]))
        for name, value in zip(features.USER_FEATURES, row[1:], strict=True):
            if value is None:
                continue
            if name not in online or abs(online[name] - float(value)) > 1e-9:
                mismatches.append(f"user {row[0]} {name}: redis {online.get(name)} != {value}")
    return dg.AssetCheckResult(
        passed=bool(rows) and not mismatches,
        metadata={"sampled_users": len(rows), "mismatches": dg.MetadataValue.json(mismatches[:20])},
    )
