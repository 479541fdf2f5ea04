-- One row per product: its attributes as last seen, activity span and lifetime counts.
--
-- "Last seen" = the product's latest event in the order used everywhere (event_time, funnel
-- rank, event_id), so ties are deterministic; category, brand and price all come from that one
-- event (a null brand on it stays null). macros/latest_per_key.sql picks it (arg_max on
-- DuckDB, a row_number window elsewhere).
with events as (

    select
        product_id,
        event_time,
        funnel_rank,
        event_id,
        event_type,
        category_id,
        category_code,
        category_l1,
        category_l2,
        brand,
        price
    from {{ ref('stg_events') }}

),

totals as (

    select
        product_id,
        min(event_time) as first_seen,
        max(event_time) as last_seen,
        count(*) as events,
        sum(case when event_type = 'view' then 1 else 0 end) as views,
        sum(case when event_type = 'cart' then 1 else 0 end) as carts,
        sum(case when event_type = 'remove_from_cart' then 1 else 0 end) as removes,
        sum(case when event_type = 'purchase' then 1 else 0 end) as purchases
    from events
    group by product_id

),

latest as (

    {{ latest_per_key(
        'events',
        'product_id',
        ['event_time', 'funnel_rank', 'event_id'],
        ['category_id', 'category_code', 'category_l1', 'category_l2', 'brand', 'price']
    ) }}

)

select
    totals.product_id,
    latest.category_id,
    latest.category_code,
    latest.category_l1,
    latest.category_l2,
    latest.brand,
    latest.price as last_price,
    totals.first_seen,
    totals.last_seen,
    cast(totals.events as bigint) as events,
    cast(totals.views as bigint) as views,
    cast(totals.carts as bigint) as carts,
    cast(totals.removes as bigint) as removes,
    cast(totals.purchases as bigint) as purchases
from totals
inner join latest
    on latest.product_id = totals.product_id
