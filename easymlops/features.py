"""Feature names, their order in the model, and the Redis key layout: one definition used by
dbt (column names), the online-store materialization, training and serving.

Definitions (computed in dbt_project/models; serving reads the same values from Redis):
- session features, at the moment of a cart event, from events of the same session strictly
  before it: events, views, views of this product, carts, seconds since the session's first
  event, distinct products viewed;
- user features as of day D, from the user's events on days before D: sessions, views, carts,
  purchases, purchase rate (purchases per cart, smoothed), average price of viewed products;
- product features as of day D, from events on days before D: views, carts, purchases,
  conversion rate (purchases per cart, smoothed), average price, that price relative to the
  median price of the product's category;
- request attributes: the price in the request.
"""

from __future__ import annotations

REQUEST_FEATURES: tuple[str, ...] = ("price",)
SESSION_FEATURES: tuple[str, ...] = (
    "session_events",
    "session_views",
    "session_product_views",
    "session_carts",
    "session_seconds",
    "session_distinct_products",
)
USER_FEATURES: tuple[str, ...] = (
    "user_sessions",
    "user_views",
    "user_carts",
    "user_purchases",
    "user_purchase_rate",
    "user_avg_price",
)
PRODUCT_FEATURES: tuple[str, ...] = (
    "product_views",
    "product_carts",
    "product_purchases",
    "product_conversion_rate",
    "product_avg_price",
    "product_price_vs_category",
)
MODEL_FEATURES: tuple[str, ...] = (
    REQUEST_FEATURES + SESSION_FEATURES + USER_FEATURES + PRODUCT_FEATURES
)
LABEL = "label"

# Bump when a definition changes: serving refuses features written under another version.
FEATURE_SET_VERSION = "v1"

META_KEY = "feat:meta"


def user_key(user_id: int) -> str:
    return f"feat:user:{user_id}"


def product_key(product_id: int) -> str:
    return f"feat:product:{product_id}"


def session_key(user_session: str) -> str:
    return f"feat:session:{user_session}"
