-- One row per session: its user, start and end, duration, counts by event type and whether it
-- converted (had at least one purchase). The session aggregates come from int_sessions.
select
    user_session,
    user_id,
    session_date,
    session_start,
    session_end,
    cast(extract(epoch from (session_end - session_start)) as double precision)
        as duration_seconds,
    events,
    views,
    carts,
    removes,
    purchases,
    distinct_products,
    purchase_value,
    case when purchases > 0 then 1 else 0 end as converted
from {{ ref('int_sessions') }}
