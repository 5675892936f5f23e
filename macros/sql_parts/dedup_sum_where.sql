{% macro dedup_sum_where(expression, condition) %}
    {#- The sum of `expression` over the rows where `condition` holds; NULL if none does. -#}
    {{ return(adapter.dispatch("dedup_sum_where", "dedup")(expression, condition)) }}
{% endmacro %}

{% macro default__dedup_sum_where(expression, condition) %}
    {{ return("sum(case when " ~ condition ~ " then " ~ expression ~ " end)") }}
{% endmacro %}

{% macro postgres__dedup_sum_where(expression, condition) %}
    {#- An aggregate's FILTER clause says it directly; few databases but PostgreSQL have one. -#}
    {{ return("sum(" ~ expression ~ ") filter (where " ~ condition ~ ")") }}
{% endmacro %}
