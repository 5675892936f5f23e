{% macro dedup_any_null(columns) %}
    {#- Whether any of the columns is NULL, as one condition in parentheses. -#}
    {{ return(adapter.dispatch("dedup_any_null", "dedup")(columns)) }}
{% endmacro %}

{% macro default__dedup_any_null(columns) %}
    {%- set checks = [] -%}
    {%- for column in columns -%}
        {%- do checks.append(dedup.dedup_quote(column) ~ " is null") -%}
    {%- endfor -%}
    {{ return("(" ~ checks | join(" or ") ~ ")") }}
{% endmacro %}
