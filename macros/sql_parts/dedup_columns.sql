{% macro dedup_columns(columns, prefix=none) %}
    {#- A comma-separated list of quoted column names, optionally qualified. -#}
    {{ return(adapter.dispatch("dedup_columns", "dedup")(columns, prefix)) }}
{% endmacro %}

{% macro default__dedup_columns(columns, prefix) %}
    {%- set quoted = [] -%}
    {%- for column in columns -%}
        {%- do quoted.append((prefix ~ "." if prefix else "") ~ dedup.dedup_quote(column)) -%}
    {%- endfor -%}
    {{ return(quoted | join(", ")) }}
{% endmacro %}
