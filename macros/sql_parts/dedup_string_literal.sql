{% macro dedup_string_literal(value) %}
    {#- The value as an SQL string literal, its quotes doubled. -#}
    {{ return(adapter.dispatch("dedup_string_literal", "dedup")(value)) }}
{% endmacro %}

{% macro default__dedup_string_literal(value) %}
    {{ return("'" ~ (value | string | replace("'", "''")) ~ "'") }}
{% endmacro %}
