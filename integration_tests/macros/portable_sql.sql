{#
    With `--vars '{dedup_portable_sql: true}'` every postgres__ implementation of the package
    gives way to its default__ one, so that the portable SQL runs here too, on PostgreSQL, and
    must give what PostgreSQL's own gives: pytests/test_other_project.py builds both and
    compares them, and checks that this file overrides every postgres__ of the package. dbt
    finds these first because dbt_project.yml's dispatch searches this project before dedup.
#}

{% macro postgres__dedup_key_groups(upstream) %}
    {%- if var("dedup_portable_sql", false) -%}
        {{ return(dedup.default__dedup_key_groups(upstream)) }}
    {%- endif -%}
    {{ return(dedup.postgres__dedup_key_groups(upstream)) }}
{% endmacro %}

{% macro postgres__dedup_key_groups_ctes(relation, spec, prefix) %}
    {%- if var("dedup_portable_sql", false) -%}
        {{ return(dedup.default__dedup_key_groups_ctes(relation, spec, prefix)) }}
    {%- endif -%}
    {{ return(dedup.postgres__dedup_key_groups_ctes(relation, spec, prefix)) }}
{% endmacro %}

{% macro postgres__dedup_backfilled_column(column, spec) %}
    {%- if var("dedup_portable_sql", false) -%}
        {{ return(dedup.default__dedup_backfilled_column(column, spec)) }}
    {%- endif -%}
    {{ return(dedup.postgres__dedup_backfilled_column(column, spec)) }}
{% endmacro %}

{% macro postgres__dedup_in_subquery(expression, subquery) %}
    {%- if var("dedup_portable_sql", false) -%}
        {{ return(dedup.default__dedup_in_subquery(expression, subquery)) }}
    {%- endif -%}
    {{ return(dedup.postgres__dedup_in_subquery(expression, subquery)) }}
{% endmacro %}

{% macro postgres__dedup_exists_select() %}
    {%- if var("dedup_portable_sql", false) -%}
        {{ return(dedup.default__dedup_exists_select()) }}
    {%- endif -%}
    {{ return(dedup.postgres__dedup_exists_select()) }}
{% endmacro %}

{% macro postgres__dedup_sum_where(expression, condition) %}
    {%- if var("dedup_portable_sql", false) -%}
        {{ return(dedup.default__dedup_sum_where(expression, condition)) }}
    {%- endif -%}
    {{ return(dedup.postgres__dedup_sum_where(expression, condition)) }}
{% endmacro %}

{% macro postgres__test_dedup_tiebreaker_unique(model) %}
    {%- if var("dedup_portable_sql", false) -%}
        {{ return(dedup.default__test_dedup_tiebreaker_unique(model)) }}
    {%- endif -%}
    {{ return(dedup.postgres__test_dedup_tiebreaker_unique(model)) }}
{% endmacro %}
