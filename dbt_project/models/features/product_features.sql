-- Product history, one row per (product_id, valid_from) for each day the product had events.
--
-- Same validity rule as user_features: activity_date = A, cumulative over days <= A,
-- valid_from = A + 1, valid_to = the next row's valid_from (null on the latest row).
--
-- product_views/carts/purchases  event counts
-- product_conversion_rate  (purchases + 1) / (carts + 5): purchases per cart, smoothed
-- product_avg_price        mean price over all of the product's events
-- product_price_vs_category  product_avg_price / the median product_avg_price of the
--     products of the same category_id that have a row with the same activity_date (i.e.
--     were active that day, each with its cumulative average price). Computed per day from
--     rows that exist anyway, so no per-date cross join; 1.0 when the product is the only
--     one of its category that day. category_id: the largest seen for the product that day
--     (products have one category in practice).
with events as (

    select * from {{ ref('stg_events') }}

),

daily as (

    select
        product_id,
        event_date as activity_date,
        max(category_id) as category_id,
        sum(case when event_type = 'view' then 1 else 0 end) as views,
        sum(case when event_type = 'cart' then 1 else 0 end) as carts,
        sum(case when event_type = 'purchase' then 1 else 0 end) as purchases,
        count(*) as events,
        sum(price) as price_sum
    from events
    group by product_id, event_date

),

cumulative as (

    select
        product_id,
        activity_date,
        category_id,
        sum(views) over product_history as product_views,
        sum(carts) over product_history as product_carts,
        sum(purchases) over product_history as product_purchases,
        cast(sum(price_sum) over product_history as double precision)
            / sum(events) over product_history as product_avg_price
    from daily
    window product_history as (
        partition by product_id
        order by activity_date
        rows between unbounded preceding and current row
    )

),

category_medians as (

    select
        category_id,
        activity_date,
        percentile_cont(0.5) within group (order by product_avg_price) as category_median_price
    from cumulative
    group by category_id, activity_date

)

select
    cumulative.product_id,
    cumulative.category_id,
    cumulative.activity_date,
    cumulative.activity_date + 1 as valid_from,
    lead(cumulative.activity_date + 1) over (
        partition by cumulative.product_id order by cumulative.activity_date
    ) as valid_to,
    cast(cumulative.product_views as bigint) as product_views,
    cast(cumulative.product_carts as bigint) as product_carts,
    cast(cumulative.product_purchases as bigint) as product_purchases,
    cast(cumulative.product_purchases + 1 as double precision)
        / (cumulative.product_carts + 5) as product_conversion_rate,
    cumulative.product_avg_price,
    case
        when category_medians.category_median_price > 0
            then cumulative.product_avg_price / category_medians.category_median_price
    end as product_price_vs_category
from cumulative
inner join category_medians
    on category_medians.category_id = cumulative.category_id
    and category_medians.activity_date = cumulative.activity_date
