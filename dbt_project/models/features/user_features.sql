-- User history, one row per (user_id, valid_from) for each day the user was active.
--
-- A row with activity_date = A holds the user's cumulative stats over all days <= A and is
-- valid for events on dates >= valid_from = A + 1, until the next row's valid_from
-- (valid_to, exclusive; null on the user's latest row). "User features as of day D" is the
-- row with the greatest valid_from <= D, so they only ever use days strictly before D.
--
-- user_sessions       distinct sessions (a session is counted on the day of its first event)
-- user_views/carts/purchases  event counts
-- user_purchase_rate  (purchases + 1) / (carts + 5): purchases per cart, smoothed toward 0.2
-- user_avg_price      mean price of the user's view events (null if none)
with events as (

    select * from {{ ref('stg_events') }}

),

-- sessions counted on the day they started (int_sessions.session_date)
session_starts as (

    select user_id, session_date as activity_date, count(*) as new_sessions
    from {{ ref('int_sessions') }}
    group by user_id, session_date

),

daily as (

    select
        user_id,
        event_date as activity_date,
        sum(case when event_type = 'view' then 1 else 0 end) as views,
        sum(case when event_type = 'cart' then 1 else 0 end) as carts,
        sum(case when event_type = 'purchase' then 1 else 0 end) as purchases,
        sum(case when event_type = 'view' then price else 0 end) as view_price_sum
    from events
    group by user_id, event_date

),

cumulative as (

    select
        daily.user_id,
        daily.activity_date,
        sum(coalesce(session_starts.new_sessions, 0)) over user_history as user_sessions,
        sum(daily.views) over user_history as user_views,
        sum(daily.carts) over user_history as user_carts,
        sum(daily.purchases) over user_history as user_purchases,
        sum(daily.view_price_sum) over user_history as view_price_sum
    from daily
    left join session_starts
        on session_starts.user_id = daily.user_id
        and session_starts.activity_date = daily.activity_date
    window user_history as (
        partition by daily.user_id
        order by daily.activity_date
        rows between unbounded preceding and current row
    )

)

select
    user_id,
    activity_date,
    activity_date + 1 as valid_from,
    lead(activity_date + 1) over (partition by user_id order by activity_date) as valid_to,
    cast(user_sessions as bigint) as user_sessions,
    cast(user_views as bigint) as user_views,
    cast(user_carts as bigint) as user_carts,
    cast(user_purchases as bigint) as user_purchases,
    cast(user_purchases + 1 as double precision) / (user_carts + 5) as user_purchase_rate,
    case
        when user_views > 0 then cast(view_price_sum as double precision) / user_views
    end as user_avg_price
from cumulative
