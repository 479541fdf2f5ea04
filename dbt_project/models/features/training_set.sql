-- The point-in-time training set: one row per *mature* cart event with its label, the request
-- and session features of fct_cart_events, and the user / product features as of the event's
-- day (the feature row with the greatest valid_from <= event_date, i.e. built only from days
-- strictly before the event's day). Missing history stays null, as a missing key does online.
--
-- Label maturity: a cart's label (a later purchase in its session) is final only once the
-- session is over, i.e. it has had no event for var('session_timeout_seconds') before the
-- data closes (the newest event of any session). Carts of sessions that may still go on are
-- left out of both splits until a later build, so the newest, still running day makes no
-- false negatives (a purchase that has not arrived yet).
--
-- split = 'test' for the last var('holdout_days') days of mature cart events
-- (event_date > max(event_date) - holdout_days), 'train' before that.
--
-- DuckDB in bounded memory: the project-wide pre-hooks of dbt_project.yml.
--
-- DuckDB: the maturity filter makes the planner estimate a few dozen mature carts, and under
-- its loop-join threshold for point-in-time joins (64 rows) it runs them as nested loop joins:
-- quadratic, 113 s instead of ~4 s at 2M events. This model's pre-hook sets that threshold to 0,
-- so they stay merge-style point-in-time joins whatever the estimate. (No comment here may
-- name the join type: test_dbt checks that the compiled portable variant does not.)
{{ config(
    pre_hook=[
        "{% if target.type == 'duckdb' %}set asof_loop_join_threshold = 0{% endif %}",
    ],
) }}
with data_close as (

    select max(event_time) as closed_at from {{ ref('stg_events') }}

),

cart_events as (

    select fct_cart_events.*
    from {{ ref('fct_cart_events') }} as fct_cart_events
    inner join {{ ref('int_sessions') }} as sessions
        on sessions.user_session = fct_cart_events.user_session
    cross join data_close
    where {{ dbt.dateadd('second', var('session_timeout_seconds'), 'sessions.session_end') }}
        <= data_close.closed_at

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
