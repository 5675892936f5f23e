{% macro dedup_quote(name) %}
    {#- A column's name quoted, a double quote in it doubled, as adapter.quote does not: a
        column may be named anything the database allows. -#}
    {{ return(adapter.dispatch("dedup_quote", "dedup")(name)) }}
{% endmacro %}

{% macro default__dedup_quote(name) %}
    {{ return('"' ~ (name | string | replace('"', '""')) ~ '"') }}
{% endmacro %}
