{% macro dedup_columns(columns, prefix=none) %}
    {#- A comma-separated list of quoted column names, optionally qualified. -#}
    {%- set quoted = [] -%}
    {%- for column in columns -%}
        {%- do quoted.append((prefix ~ "." if prefix else "") ~ adapter.quote(column)) -%}
    {%- endfor -%}
    {{ return(quoted | join(", ")) }}
{% endmacro %}
