{% macro dedup_key_groups_ctes(relation, spec, prefix="") %}
    {#- Two CTEs, <prefix>source_rows and <prefix>key_groups: the key groups of any relation
        with the spec's columns. The prefix lets one query hold those of several tables. -#}
    {{ return(adapter.dispatch("dedup_key_groups_ctes", "dedup")(relation, spec, prefix)) }}
{% endmacro %}

{% macro default__dedup_key_groups_ctes(relation, spec, prefix) %}
    {%- set tiebreaker = adapter.quote(spec.tiebreaker) -%}
    {%- set keep_columns = spec.keep | map(attribute="column") | reject("in", spec.natural_key) | unique | list -%}
    {#- Unless NULLs are equal (not_distinct), a row with a NULL key is a group of its own, as in
        a plain UNIQUE constraint. -#}
    {%- set nulls_distinct = spec.nulls != "not_distinct" -%}
    {%- set null_row = "case when " ~ dedup.dedup_any_null(spec.natural_key) ~ " then " ~ tiebreaker ~ " end" -%}
    {%- set group_list = [] -%}
    {%- for column in spec.natural_key -%}
        {%- do group_list.append(adapter.quote(column)) -%}
    {%- endfor -%}
    {%- if nulls_distinct -%}
        {%- do group_list.append("dedup_null_row") -%}
    {%- endif -%}
    {%- set group_columns = group_list | join(", ") -%}
    {#- The same columns as select targets, one to a line. -#}
    {%- set group_targets = group_list | join(",\n        ") -%}
    {#- The group columns sort ascending, the default, spelled out as the keep columns' order is. -#}
    {%- set keep_order = [] -%}
    {%- for column in group_list -%}
        {%- do keep_order.append(column ~ " asc") -%}
    {%- endfor -%}
    {%- for entry in spec.keep -%}
        {%- do keep_order.append(adapter.quote(entry.column) ~ " " ~ entry.order) -%}
    {%- endfor -%}

{{ prefix }}source_rows as (

    select
        {%- for column in spec.natural_key + keep_columns %}
        {{ adapter.quote(column) }}{{ "," if not loop.last else "" }}
        {%- endfor %}
        {%- if nulls_distinct %},
        {{ null_row }} as dedup_null_row
        {%- endif %}
    from {{ relation }}

),

{% if spec.keep | length == 1 -%}
{#- A keep rule on the tie-breaker alone is a max() or min(): a hash aggregate, no sort. -#}
{{ prefix }}key_groups as (

    select
        {{ group_targets }},
        {{ "max" if spec.keep[0].order == "desc" else "min" }}({{ tiebreaker }}) as dedup_kept,
        count(*) as dedup_rows
    from {{ prefix }}source_rows
    group by {{ group_columns }}

)
{%- else -%}
{#- A lexicographic keep rule needs an order: sort the narrow rows only. -#}
{{ prefix }}key_groups as (

    select distinct on ({{ group_columns }})
        {{ group_targets }},
        {{ tiebreaker }} as dedup_kept,
        count(*) over (partition by {{ group_columns }}) as dedup_rows
    from {{ prefix }}source_rows
    order by {{ keep_order | join(", ") }}

)
{%- endif %}
{%- endmacro %}
