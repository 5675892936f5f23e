{% macro dedup_any_null(columns) %}
    {%- set checks = [] -%}
    {%- for column in columns -%}
        {%- do checks.append(adapter.quote(column) ~ " is null") -%}
    {%- endfor -%}
    {{ return("(" ~ checks | join(" or ") ~ ")") }}
{% endmacro %}
