-- One row per user_session, aggregated once from stg_events: the building block of
-- fct_sessions, dim_users and the session count of user_features (a table, so those read a
-- narrow aggregate instead of re-scanning the lake through the stg_events view).
--
-- user_id       the session's user. Session ids are per user (a fresh UUID per session);
--               min() only keeps the grain one row per session if the data ever disagrees.
-- session_date  the day of the session's first event (a session crossing midnight belongs to
--               the day it started, as user_features counts it).
-- events, views, carts, removes, purchases  event counts by type
-- distinct_products  distinct products with any event in the session
-- purchase_value     sum of the prices of the session's purchase events (0 without one)
select
    user_session,
    min(user_id) as user_id,
    min(event_date) as session_date,
    min(event_time) as session_start,
    max(event_time) as session_end,
    cast(count(*) as bigint) as events,
    cast(sum(case when event_type = 'view' then 1 else 0 end) as bigint) as views,
    cast(sum(case when event_type = 'cart' then 1 else 0 end) as bigint) as carts,
    cast(sum(case when event_type = 'remove_from_cart' then 1 else 0 end) as bigint) as removes,
    cast(sum(case when event_type = 'purchase' then 1 else 0 end) as bigint) as purchases,
    cast(count(distinct product_id) as bigint) as distinct_products,
    cast(sum(case when event_type = 'purchase' then price else 0 end) as double precision)
        as purchase_value
from {{ ref('stg_events') }}
group by user_session
