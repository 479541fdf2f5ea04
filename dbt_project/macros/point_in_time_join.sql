{#
  Point-in-time LEFT JOIN of a feature table with validity rows (valid_from, valid_to) onto
  events: each event gets the row of the same key with the greatest valid_from <= its date,
  or nulls if there is none.

  strategy (var `point_in_time_join`, default `auto`):
    asof   DuckDB ASOF LEFT JOIN (DuckDB only; the fast path).
    range  portable LEFT JOIN on key and valid_from <= date < coalesce(valid_to, 9999-12-31);
           relies on the feature table's valid_to being the next row's valid_from. Do not
           write it as `valid_to is null or ...`: DuckDB then plans a nested-loop join.
    auto   asof on duckdb, range elsewhere (postgres).
#}
{% macro point_in_time_join(features, alias, key, event_alias, event_date) -%}
    {%- set strategy = var('point_in_time_join', 'auto') -%}
    {%- if strategy == 'auto' -%}
        {%- set strategy = 'asof' if target.type == 'duckdb' else 'range' -%}
    {%- endif -%}
    {%- if strategy == 'asof' -%}
    asof left join {{ features }} as {{ alias }}
        on {{ alias }}.{{ key }} = {{ event_alias }}.{{ key }}
        and {{ event_alias }}.{{ event_date }} >= {{ alias }}.valid_from
    {%- elif strategy == 'range' -%}
    left join {{ features }} as {{ alias }}
        on {{ alias }}.{{ key }} = {{ event_alias }}.{{ key }}
        and {{ alias }}.valid_from <= {{ event_alias }}.{{ event_date }}
        and {{ event_alias }}.{{ event_date }} < coalesce({{ alias }}.valid_to, cast('9999-12-31' as date))
    {%- else -%}
        {{ exceptions.raise_compiler_error("var point_in_time_join must be auto, asof or range, got " ~ strategy) }}
    {%- endif -%}
{%- endmacro %}
