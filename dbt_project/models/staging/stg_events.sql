-- Typed view over the silver events. Silver is already deduplicated, but a replayed
-- partition or an overlapping backfill must not double-count anything downstream, so
-- duplicates of an event_id are dropped here as well, keeping the earliest event_time.
-- Copies of one event_id are the same event (the id is given by the producer or derived
-- from the event's fields), so which of two same-instant copies survives does not matter;
-- ordering by more columns made every scan of this view ~30% slower at 10M events.
with silver as (

    select * from {{ source('lake', 'silver_events') }}

),

typed as (

    select
        cast(event_id as varchar) as event_id,
        cast(event_time as timestamp) as event_time,
        cast(event_date as date) as event_date,
        cast(event_type as varchar) as event_type,
        cast(product_id as bigint) as product_id,
        cast(category_id as bigint) as category_id,
        cast(category_code as varchar) as category_code,
        cast(brand as varchar) as brand,
        cast(price as double precision) as price,
        cast(user_id as bigint) as user_id,
        cast(user_session as varchar) as user_session
    from silver

),

ranked as (

    select
        typed.*,
        row_number() over (
            partition by event_id
            order by event_time
        ) as duplicate_rank
    from typed

)

select
    event_id,
    event_time,
    event_date,
    event_type,
    -- Position of the event type in the funnel; breaks event_time ties inside a session
    -- (see fct_cart_events).
    case event_type
        when 'view' then 0
        when 'cart' then 1
        when 'remove_from_cart' then 2
        when 'purchase' then 3
    end as funnel_rank,
    product_id,
    category_id,
    category_code,
    nullif(split_part(category_code, '.', 1), '') as category_l1,
    nullif(split_part(category_code, '.', 2), '') as category_l2,
    brand,
    price,
    user_id,
    user_session
from ranked
where duplicate_rank = 1
