-- The point-in-time training set: one row per cart event with its label, the request and
-- session features of fct_cart_events, and the user / product features as of the event's
-- day (the feature row with the greatest valid_from <= event_date, i.e. built only from days
-- strictly before the event's day). Missing history stays null, as a missing key does online.
--
-- split = 'test' for the last var('holdout_days') days of cart events (event_date >
-- max(event_date) - holdout_days), 'train' before that.
with cart_events as (

    select * from {{ ref('fct_cart_events') }}

),

bounds as (

    select max(event_date) as last_date from cart_events

)

select
    cart_events.event_id,
    cart_events.event_time,
    cart_events.event_date,
    cart_events.user_id,
    cart_events.product_id,
    cart_events.category_id,
    cart_events.user_session,
    cart_events.label,
    case
        when cart_events.event_date > bounds.last_date - cast({{ var('holdout_days') }} as integer)
            then 'test'
        else 'train'
    end as split,
    -- request
    cart_events.price,
    -- session
    cart_events.session_events,
    cart_events.session_views,
    cart_events.session_product_views,
    cart_events.session_carts,
    cart_events.session_seconds,
    cart_events.session_distinct_products,
    -- user, as of the previous day
    uf.user_sessions,
    uf.user_views,
    uf.user_carts,
    uf.user_purchases,
    uf.user_purchase_rate,
    uf.user_avg_price,
    -- product, as of the previous day
    pf.product_views,
    pf.product_carts,
    pf.product_purchases,
    pf.product_conversion_rate,
    pf.product_avg_price,
    pf.product_price_vs_category,
    -- audit
    uf.valid_from as user_features_valid_from,
    pf.valid_from as product_features_valid_from
from cart_events
cross join bounds
{{ point_in_time_join(ref('user_features'), 'uf', 'user_id', 'cart_events', 'event_date') }}
{{ point_in_time_join(ref('product_features'), 'pf', 'product_id', 'cart_events', 'event_date') }}
