{#
  Daily partitions. Dagster's gold_daily_models pass the partitions of a run as the
  environment variables EASYMLOPS_DBT_MIN_DATE and EASYMLOPS_DBT_MAX_DATE (inclusive ISO
  dates; easymlops.warehouse.dbt_env); unset or empty, a model covers every date.
  Not --vars: dbt parses the whole project again whenever the vars differ from those of the
  parse it kept (~5 s of CPU per run), while a changed environment variable re-parses only the
  files that read it (fct_cart_events).
#}

{% macro has_daily_window() -%}
  {{ return(env_var('EASYMLOPS_DBT_MIN_DATE', '') != '' and env_var('EASYMLOPS_DBT_MAX_DATE', '') != '') }}
{%- endmacro %}

{# The SQL condition selecting the run's dates of `column` ("true" without a window). #}
{% macro in_daily_window(column) -%}
  {%- if has_daily_window() -%}
    {{ column }} between cast('{{ env_var("EASYMLOPS_DBT_MIN_DATE") }}' as date) and cast('{{ env_var("EASYMLOPS_DBT_MAX_DATE") }}' as date)
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
