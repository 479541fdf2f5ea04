{#
  Daily partitions. Dagster's gold_daily_models pass the partitions of a run as
  --vars '{"min_date": "YYYY-MM-DD", "max_date": "YYYY-MM-DD"}' (inclusive); without them a
  model covers every date.
#}

{% macro has_daily_window() -%}
  {{ return(var('min_date', none) is not none and var('max_date', none) is not none) }}
{%- endmacro %}

{# The SQL condition selecting the run's dates of `column` ("true" without a window). #}
{% macro in_daily_window(column) -%}
  {%- if has_daily_window() -%}
    {{ column }} between cast('{{ var("min_date") }}' as date) and cast('{{ var("max_date") }}' as date)
  {%- else -%}
    true
  {%- endif -%}
{%- endmacro %}

{#
  pre_hook of an incremental daily model: deletes the rows of the run's dates (every row
  without a window) before the model appends them again, in the same transaction, so a date
  rebuilt twice holds its rows once and a date that lost its events ends up empty.
#}
{% macro delete_daily_window(column='event_date') -%}
  {%- if is_incremental() -%}
    delete from {{ this }} where {{ in_daily_window(column) }}
  {%- endif -%}
{%- endmacro %}
