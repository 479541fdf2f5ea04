{#
  Fails with one row per duplicated combination of `columns` (a compound unique key).
  Written here because dbt packages (dbt_utils) cannot be downloaded in this environment.
#}
{% test unique_combination_of_columns(model, columns) %}

select
    {{ columns | join(', ') }},
    count(*) as n_rows
from {{ model }}
group by {{ columns | join(', ') }}
having count(*) > 1

{% endtest %}
