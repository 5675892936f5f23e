{#
    The keep rule must name one row per key, so it ends in a column that is unique and NOT NULL;
    otherwise ties would make the surviving row a matter of chance. Fails with a row saying why.
#}
{% test dedup_tiebreaker_unique(model) %}
    {{ return(adapter.dispatch("test_dedup_tiebreaker_unique", "dedup")(model)) }}
{% endtest %}

{% macro default__test_dedup_tiebreaker_unique(model) %}
    {%- set spec = dedup.dedup_spec_for_relation(model) if execute else {"tiebreaker": "parsing"} -%}
    {%- set tiebreaker = adapter.quote(spec.tiebreaker) %}
    {#- Without a catalog to ask, look at the data. #}
select {{ tiebreaker }} as tiebreaker, count(*) as rows_with_value
from {{ model }}
group by {{ tiebreaker }}
having count(*) > 1 or {{ tiebreaker }} is null
{%- endmacro %}

{% macro postgres__test_dedup_tiebreaker_unique(model) %}
    {#- PostgreSQL can answer from the catalog: a single-column unique index and NOT NULL
        guarantee it for every row, now and later, without scanning a large table. #}
    {%- set spec = dedup.dedup_spec_for_relation(model) if execute else {"tiebreaker": "parsing"} %}

with tiebreaker_column as (

    select
        attribute.attnum,
        attribute.attnotnull
    from pg_catalog.pg_attribute as attribute
    where attribute.attrelid = to_regclass(format('%I.%I', {{ dedup.dedup_string_literal(model.schema) }}, {{ dedup.dedup_string_literal(model.identifier) }}))
        and attribute.attname = {{ dedup.dedup_string_literal(spec.tiebreaker) }}
        and not attribute.attisdropped

),

unique_indexes as (

    select index.indexrelid
    from pg_catalog.pg_index as index
    inner join tiebreaker_column on index.indkey[0] = tiebreaker_column.attnum
    where index.indrelid = to_regclass(format('%I.%I', {{ dedup.dedup_string_literal(model.schema) }}, {{ dedup.dedup_string_literal(model.identifier) }}))
        and index.indisunique
        and index.indisvalid
        and index.indnkeyatts = 1
        and index.indpred is null
        and index.indexprs is null

),

problems as (

    select 'keep order ends in {{ spec.tiebreaker | replace("'", "''") }}, which is not a column' as problem
    where not exists (select from tiebreaker_column)
    union all
    select 'keep order ends in {{ spec.tiebreaker | replace("'", "''") }}, which allows NULL' as problem
    from tiebreaker_column
    where not tiebreaker_column.attnotnull
    union all
    select 'keep order ends in {{ spec.tiebreaker | replace("'", "''") }}, which has no single-column unique index' as problem
    where exists (select from tiebreaker_column)
        and not exists (select from unique_indexes)

)

select * from problems
{%- endmacro %}
