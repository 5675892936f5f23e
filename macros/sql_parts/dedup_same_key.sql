{% macro dedup_same_key(columns, left, right) %}
    {#- The rows `left` and `right` have the same key, a NULL equal to a NULL: the same row's
        key as it was and as it is. -#}
    {{ return(adapter.dispatch("dedup_same_key", "dedup")(columns, left, right)) }}
{% endmacro %}

{% macro default__dedup_same_key(columns, left, right) %}
    {%- set checks = [] -%}
    {%- for column in columns -%}
        {%- do checks.append(left ~ "." ~ dedup.dedup_quote(column) ~ " is not distinct from " ~ right ~ "." ~ dedup.dedup_quote(column)) -%}
    {%- endfor -%}
    {{ return(checks | join(" and ")) }}
{% endmacro %}
