{% macro dedup_exists_select() %}
    {#- The select list of an EXISTS subquery, whose rows matter only by being there. -#}
    {{ return(adapter.dispatch("dedup_exists_select", "dedup")()) }}
{% endmacro %}

{% macro default__dedup_exists_select() %}
    {#- The standard wants at least one column: any constant does. -#}
    {{ return("select 1") }}
{% endmacro %}

{% macro postgres__dedup_exists_select() %}
    {#- PostgreSQL selects no column at all, which says so. -#}
    {{ return("select") }}
{% endmacro %}
