-- Fails (returns rows) if a training row's user or product history is not exactly the
-- history of the days strictly before the row's event_date.
--
-- Recomputed here from stg_events, independently of user_features, product_features and the
-- point-in-time join: a leak anywhere in them (a feature row valid on its own activity day,
-- `valid_from = activity_date`; a join on <= that picks a later row; history cumulated past
-- the day) changes these counts, whatever the audit columns say. Null features mean "no
-- history": they must match a user or product with no event before that day.
{{ config(meta={'dagster': {'ref': {'name': 'training_set'}}}) }}

with training_rows as (

    select
        event_id, event_date, user_id, product_id,
        user_views, user_carts, user_purchases,
        product_views, product_carts, product_purchases
    from {{ ref('training_set') }}

),

user_days as (

    select
        user_id,
        event_date,
        sum(case when event_type = 'view' then 1 else 0 end) as views,
        sum(case when event_type = 'cart' then 1 else 0 end) as carts,
        sum(case when event_type = 'purchase' then 1 else 0 end) as purchases
    from {{ ref('stg_events') }}
    group by user_id, event_date

),

product_days as (

    select
        product_id,
        event_date,
        sum(case when event_type = 'view' then 1 else 0 end) as views,
        sum(case when event_type = 'cart' then 1 else 0 end) as carts,
        sum(case when event_type = 'purchase' then 1 else 0 end) as purchases
    from {{ ref('stg_events') }}
    group by product_id, event_date

),

user_before as (

    select
        training_rows.event_id,
        sum(user_days.views) as views,
        sum(user_days.carts) as carts,
        sum(user_days.purchases) as purchases
    from training_rows
    inner join user_days
        on user_days.user_id = training_rows.user_id
        and user_days.event_date < training_rows.event_date
    group by training_rows.event_id

),

product_before as (

    select
        training_rows.event_id,
        sum(product_days.views) as views,
        sum(product_days.carts) as carts,
        sum(product_days.purchases) as purchases
    from training_rows
    inner join product_days
        on product_days.product_id = training_rows.product_id
        and product_days.event_date < training_rows.event_date
    group by training_rows.event_id

)

select
    training_rows.event_id,
    training_rows.event_date,
    training_rows.user_views,
    user_before.views as user_views_before,
    training_rows.product_views,
    product_before.views as product_views_before
from training_rows
left join user_before on user_before.event_id = training_rows.event_id
left join product_before on product_before.event_id = training_rows.event_id
where training_rows.user_views is distinct from user_before.views
    or training_rows.user_carts is distinct from user_before.carts
    or training_rows.user_purchases is distinct from user_before.purchases
    or training_rows.product_views is distinct from product_before.views
    or training_rows.product_carts is distinct from product_before.carts
    or training_rows.product_purchases is distinct from product_before.purchases
