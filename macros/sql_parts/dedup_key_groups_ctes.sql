{% macro dedup_key_groups_ctes(relation, spec, prefix="") %}
    {#- CTEs from <prefix>source_rows to <prefix>key_groups: the key groups of any relation with
        the spec's columns, one row per natural key with the tie-breaker of the row to keep
        (dedup_kept) and how many rows share the key (dedup_rows). The prefix lets one query
        hold those of several tables. -#}
    {{ return(adapter.dispatch("dedup_key_groups_ctes", "dedup")(relation, spec, prefix)) }}
{% endmacro %}

{% macro default__dedup_key_groups_ctes(relation, spec, prefix) -%}
{{ dedup._dedup_source_rows_cte(relation, spec, prefix) }},

{% if dedup._dedup_keep_is_an_aggregate(relation, spec) -%}
{{ dedup._dedup_key_groups_by_aggregate(spec, prefix) }}
{%- else -%}
{#- A lexicographic keep rule needs an order: number the narrow rows of each group in it, and
    keep the first. -#}
{%- set group_columns = dedup._dedup_group_columns(spec) -%}
{{ prefix }}ranked_rows as (

    select
        {{ group_columns | join(",\n        ") }},
        {{ dedup.dedup_quote(spec.tiebreaker) }} as dedup_kept,
        row_number() over (
            partition by {{ group_columns | join(", ") }}
            order by {{ dedup._dedup_keep_order(spec) | join(", ") }}
        ) as dedup_rank,
        count(*) over (partition by {{ group_columns | join(", ") }}) as dedup_rows
    from {{ prefix }}source_rows

),

{{ prefix }}key_groups as (

    select
        {{ group_columns | join(",\n        ") }},
        dedup_kept,
        dedup_rows
    from {{ prefix }}ranked_rows
    where dedup_rank = 1

)
{%- endif %}
{%- endmacro %}

{% macro postgres__dedup_key_groups_ctes(relation, spec, prefix) -%}
{{ dedup._dedup_source_rows_cte(relation, spec, prefix) }},

{% if dedup._dedup_keep_is_an_aggregate(relation, spec) -%}
{{ dedup._dedup_key_groups_by_aggregate(spec, prefix) }}
{%- else -%}
{#- A lexicographic keep rule needs an order: DISTINCT ON takes each group's first row in it,
    in one sort of the narrow rows, with no window to number them in. Its order begins with the
    group columns, ascending, the default, spelled out as the keep columns' order is. -#}
{%- set group_columns = dedup._dedup_group_columns(spec) -%}
{%- set keep_order = [] -%}
{%- for column in group_columns -%}
    {%- do keep_order.append(column ~ " asc") -%}
{%- endfor -%}
{{ prefix }}key_groups as (

    select distinct on ({{ group_columns | join(", ") }})
        {{ group_columns | join(",\n        ") }},
        {{ dedup.dedup_quote(spec.tiebreaker) }} as dedup_kept,
        count(*) over (partition by {{ group_columns | join(", ") }}) as dedup_rows
    from {{ prefix }}source_rows
    order by {{ (keep_order + dedup._dedup_keep_order(spec)) | join(", ") }}

)
{%- endif %}
{%- endmacro %}

{% macro _dedup_source_rows_cte(relation, spec, prefix) -%}
    {#- The narrow rows: the key and keep columns only. -#}
    {%- set keep_columns = spec.keep | map(attribute="column") | reject("in", spec.natural_key) | unique | list -%}
{{ prefix }}source_rows as (

    select
        {%- for column in spec.natural_key + keep_columns %}
        {{ dedup.dedup_quote(column) }}{{ "," if not loop.last else "" }}
        {%- endfor %}
        {%- if spec.nulls != "not_distinct" %},
        case when {{ dedup.dedup_any_null(spec.natural_key) }} then {{ dedup.dedup_quote(spec.tiebreaker) }} end as dedup_null_row
        {%- endif %}
        {%- for term in dedup.dedup_alternative_terms(spec) %},
        {{ term }} as dedup_alternative_{{ loop.index }}
        {%- endfor %}
    from {{ relation }}

)
{%- endmacro %}

{% macro _dedup_group_columns(spec) %}
    {#- What a key group is grouped by: the natural key, and unless NULLs are equal
        (not_distinct), dedup_null_row, which makes a row with a NULL key a group of its own,
        as in a plain UNIQUE constraint; with an alternative key, what it adds where the
        natural key has a NULL (dedup_alternative_terms). -#}
    {%- set group_columns = [] -%}
    {%- for column in spec.natural_key -%}
        {%- do group_columns.append(dedup.dedup_quote(column)) -%}
    {%- endfor -%}
    {%- for term in dedup.dedup_alternative_terms(spec) -%}
        {%- do group_columns.append("dedup_alternative_" ~ loop.index) -%}
    {%- endfor -%}
    {%- if spec.nulls != "not_distinct" -%}
        {%- do group_columns.append("dedup_null_row") -%}
    {%- endif -%}
    {{ return(group_columns) }}
{% endmacro %}

{% macro _dedup_keep_order(spec) %}
    {#- The keep rule as an order, its first row the one to keep. -#}
    {%- set keep_order = [] -%}
    {%- for entry in spec.keep -%}
        {%- do keep_order.append(dedup.dedup_quote(entry.column) ~ " " ~ entry.order) -%}
    {%- endfor -%}
    {{ return(keep_order) }}
{% endmacro %}

{% macro _dedup_keep_is_an_aggregate(relation, spec) %}
    {#- Whether the keep rule is the tie-breaker alone, of a type max() and min() take: not a
        uuid, for one, which has no max(); such a rule is then kept in order, as one of
        several columns is. -#}
    {%- if spec.keep | length != 1 -%}{{ return(false) }}{%- endif -%}
    {%- if not execute -%}{{ return(true) }}{%- endif -%}
    {%- set ordered = ["smallint", "integer", "bigint", "numeric", "real", "double precision",
                       "text", "character varying", "character", "date", "time", "timestamp",
                       "interval", "money", "inet", "oid"] -%}
    {%- for column in adapter.get_columns_in_relation(relation) -%}
        {%- if column.name == spec.tiebreaker -%}
            {%- set type = column.data_type | lower -%}
            {{ return(ordered | select("in", type) | list | length > 0) }}
        {%- endif -%}
    {%- endfor -%}
    {{ return(false) }}
{% endmacro %}

{% macro _dedup_key_groups_by_aggregate(spec, prefix) -%}
{#- A keep rule on the tie-breaker alone is a max() or min(): a hash aggregate, no sort. -#}
{%- set group_columns = dedup._dedup_group_columns(spec) -%}
{{ prefix }}key_groups as (

    select
        {{ group_columns | join(",\n        ") }},
        {{ "max" if spec.keep[0].order == "desc" else "min" }}({{ dedup.dedup_quote(spec.tiebreaker) }}) as dedup_kept,
        count(*) as dedup_rows
    from {{ prefix }}source_rows
    group by {{ group_columns | join(", ") }}

)
{%- endmacro %}
