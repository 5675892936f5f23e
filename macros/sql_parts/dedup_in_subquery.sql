{% macro dedup_in_subquery(expression, subquery) %}
    {#- The condition that `expression` is one of the values that `subquery` selects. -#}
    {{ return(adapter.dispatch("dedup_in_subquery", "dedup")(expression, subquery)) }}
{% endmacro %}

{% macro default__dedup_in_subquery(expression, subquery) %}
    {{ return(expression ~ " in (" ~ subquery ~ ")") }}
{% endmacro %}

{% macro postgres__dedup_in_subquery(expression, subquery) %}
    {#- The values as one array: PostgreSQL then looks them up with one index scan or bitmap
        heap scan over the sorted values, in the table's physical order, instead of one random
        read per row in the order a hash join happens to produce them. -#}
    {{ return(expression ~ " = any(array(" ~ subquery ~ "))") }}
{% endmacro %}
