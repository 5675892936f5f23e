{#
    Fails on every natural key that the UNIQUE constraint `runner swap` adds would reject, with
    the same NULL semantics:
      not_distinct: NULLs are equal (UNIQUE NULLS NOT DISTINCT); GROUP BY already treats them so;
                    with an alternative_key, rows with a NULL in the natural key are grouped by
                    it instead;
      distinct:     a key with a NULL never conflicts (plain UNIQUE), so such rows are skipped;
      forbidden:    a NULL in the key is a failure of its own, as under NOT NULL;
      backfill:     NULL keys were to be replaced with fresh uuids, so one left is a failure.
#}
{% test dedup_natural_key_unique(model) %}
    {{ return(adapter.dispatch("test_dedup_natural_key_unique", "dedup")(model)) }}
{% endtest %}

{% macro default__test_dedup_natural_key_unique(model) %}
    {%- set spec = dedup.dedup_spec_for_relation(model) if execute else {"natural_key": ["parsing"], "nulls": "not_distinct"} -%}
    {#- With an alternative key, what it adds where the natural key has a NULL is grouped by
        too: the partial unique indexes beside the constraint hold it. -#}
    {%- set alternative_terms = dedup.dedup_alternative_terms(spec) if execute else [] -%}
    {%- set keys = ([dedup.dedup_columns(spec.natural_key)] + alternative_terms) | join(", ") -%}
    {#- The same columns as select targets, one to a line. -#}
    {%- set quoted_keys = [] -%}
    {%- for column in spec.natural_key -%}
        {%- do quoted_keys.append(dedup.dedup_quote(column)) -%}
    {%- endfor -%}
    {%- for term in alternative_terms -%}
        {%- do quoted_keys.append(term ~ " as dedup_alternative_" ~ loop.index) -%}
    {%- endfor -%}
    {%- set key_targets = quoted_keys | join(",\n        ") %}

with duplicate_keys as (

    select
        {{ key_targets }},
        count(*) as rows_with_key,
        'duplicate key' as problem
    from {{ model }}
    {%- if spec.nulls in ["distinct", "backfill"] %}
    where not {{ dedup.dedup_any_null(spec.natural_key) }}
    {%- endif %}
    group by {{ keys }}
    having count(*) > 1

)
{%- if spec.nulls in ["forbidden", "backfill"] %},

null_keys as (

    select
        {{ key_targets }},
        1 as rows_with_key,
        'null in natural key' as problem
    from {{ model }}
    where {{ dedup.dedup_any_null(spec.natural_key) }}

)

select * from duplicate_keys
union all
select * from null_keys
{%- else %}

select * from duplicate_keys
{%- endif %}
{% endmacro %}
