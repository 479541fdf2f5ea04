-- A view over the silver events, typed. No deduplication here: silver holds each event_id
-- once (lake.build_silver deduplicates a date at a time, and the copies of an event share its
-- event_time, hence its date), and the `unique` test on event_id fails the build if it ever
-- does not, where a dedup window here would silently keep one of two different events that
-- share an id. That window also ran again in every model and test reading this view: dropping
-- it took the gold stage of `make bench-lakehouse` (10M events) from 54 to 31-33 s
-- (benchmarks/README.md).
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
from typed
