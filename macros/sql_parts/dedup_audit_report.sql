{% macro dedup_audit_report(tables, key_groups_ctes=[]) %}
    {#- One row per table from its key groups (one row per natural key, with dedup_rows):
        tables is a list of {name, spec, key_groups}, key_groups a relation or one of the
        key_groups_ctes, which come first. -#}
    {{ return(adapter.dispatch("dedup_audit_report", "dedup")(tables, key_groups_ctes)) }}
{% endmacro %}

{% macro default__dedup_audit_report(tables, key_groups_ctes) -%}
with
{% for cte in key_groups_ctes %}
{{ cte }},
{% endfor %}
{%- for table in tables %}
{{ table.name }} as (

    select
        {{ dedup.dedup_string_literal(table.spec.source) }} as source_table,
        coalesce(sum(dedup_rows), 0) as total_rows,
        count(*) as unique_rows,
        coalesce({{ dedup.dedup_sum_where("dedup_rows", dedup.dedup_any_null(table.spec.natural_key)) }}, 0)
            as null_key_rows
    from {{ table.key_groups }}

),
{% endfor %}
tables as (
{% for table in tables %}
    select * from {{ table.name }}
    {%- if not loop.last %}
    union all
    {%- endif %}
{%- endfor %}

),

{# The columns keep the report's order, documented in _audit__models.yml, over sqlfluff's ST06
   (plain columns before calculations). sqlfluff reports all macro output on the model's line 1,
   so this noqa covers only ST06 in the audit models. -#}
final as (

    select -- noqa: ST06
        source_table,
        total_rows,
        unique_rows,
        total_rows - unique_rows as duplicate_rows,
        round(100.0 * (total_rows - unique_rows) / nullif(total_rows, 0), 2) as duplicate_pct,
        round(1.0 * total_rows / nullif(unique_rows, 0), 1) as duplication_factor,
        null_key_rows
    from tables

)

select * from final
{%- endmacro %}
