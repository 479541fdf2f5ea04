{#
  Fails with the rows where any of `columns` is null: one scan for several columns, for
  models that are expensive to scan (stg_events is a view with a dedup window).
#}
{% test not_null_columns(model, columns) %}

select {{ columns | join(', ') }}
from {{ model }}
where {% for column in columns %}{{ column }} is null{% if not loop.last %} or {% endif %}{% endfor %}

{% endtest %}
