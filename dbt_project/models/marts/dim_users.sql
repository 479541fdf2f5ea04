-- One row per user: activity span and lifetime totals over all the user's sessions (so
-- `sessions` and the event counts equal the user's latest user_features row).
select
    user_id,
    min(session_start) as first_seen,
    max(session_end) as last_seen,
    cast(count(*) as bigint) as sessions,
    cast(sum(case when purchases > 0 then 1 else 0 end) as bigint) as converted_sessions,
    cast(sum(events) as bigint) as events,
    cast(sum(views) as bigint) as views,
    cast(sum(carts) as bigint) as carts,
    cast(sum(removes) as bigint) as removes,
    cast(sum(purchases) as bigint) as purchases,
    cast(sum(purchase_value) as double precision) as purchase_value
from {{ ref('int_sessions') }}
group by user_id
