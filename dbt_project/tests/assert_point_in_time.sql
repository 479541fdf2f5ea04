-- Fails (returns rows) if a training row carries user or product features that were not yet
-- valid on the event's day: valid_from must be <= event_date, i.e. the features were built
-- only from days strictly before the event's day.
{{ config(meta={'dagster': {'ref': {'name': 'training_set'}}}) }}

select
    event_id,
    event_date,
    user_features_valid_from,
    product_features_valid_from
from {{ ref('training_set') }}
where user_features_valid_from > event_date
    or product_features_valid_from > event_date
