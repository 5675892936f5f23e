{#
    The keep rule must name one row per key, so it ends in a column that is unique and NOT NULL;
    otherwise ties would make the surviving row a matter of chance. Fails with a row saying why.
    Under keep: any there is no such column, and a chance survivor is right only where a key's
    copies are equal in every column: it fails on each key whose copies differ.
#}
{% test dedup_tiebreaker_unique(model) %}
    {{ return(adapter.dispatch("test_dedup_tiebreaker_unique", "dedup")(model)) }}
{% endtest %}

{% macro default__test_dedup_tiebreaker_unique(model) %}
    {%- set spec = dedup.dedup_spec_for_relation(model) if execute else {"tiebreaker": "parsing"} -%}
    {%- if spec.any_copy -%}{{ return(dedup._dedup_copies_differ(model, spec)) }}{%- endif -%}
    {%- set tiebreaker = dedup.dedup_quote(spec.tiebreaker) %}
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
    {%- if spec.any_copy -%}{{ return(dedup._dedup_copies_differ(model, spec)) }}{%- endif %}

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

partitioned as (

    select
    from pg_catalog.pg_class
    where oid = to_regclass(format('%I.%I', {{ dedup.dedup_string_literal(model.schema) }}, {{ dedup.dedup_string_literal(model.identifier) }}))
        and (relkind = 'p' or relispartition)

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
        and not exists (select from partitioned)
    union all
    {#- A partitioned table can have no unique index on one column that is not its partition
        key, and its partitions seldom have one of their own: their rows are looked at instead
        (a scan, which only partitioned tables and partitions get). #}
    select 'keep order ends in {{ spec.tiebreaker | replace("'", "''") }}, whose values repeat or are NULL' as problem
    from (
        select {{ dedup.dedup_quote(spec.tiebreaker) }}
        from {{ model }}
        group by {{ dedup.dedup_quote(spec.tiebreaker) }}
        having count(*) > 1 or {{ dedup.dedup_quote(spec.tiebreaker) }} is null
        limit 1
    ) as repeated
    where exists (select from partitioned)

)

select * from problems
{%- endmacro %}


{% macro _dedup_copies_differ(model, spec) %}
    {#- The keys whose copies are not all equal in every column, compared as text, so that a
        column of a type without equality counts too (row(copies.*): a column could be named
        copies). Unless NULLs are equal, a row with a NULL in its natural key is a key of its
        own and has no copies. -#}
    {%- set alternative_terms = dedup.dedup_alternative_terms(spec, "copies") -%}
    {%- set keys = [dedup.dedup_columns(spec.natural_key, "copies")] + alternative_terms -%}
    {%- set nulls = [] -%}
    {%- for column in spec.natural_key -%}
        {%- do nulls.append("copies." ~ dedup.dedup_quote(column) ~ " is null") -%}
    {%- endfor %}

select
    {{ keys | join(",\n    ") }},
    count(*) as copies,
    count(distinct cast(row(copies.*) as text)) as different_copies,
    'keep: any, and copies of this key differ: end keep in a unique tie-breaker instead' as problem
from {{ model }} as copies
{%- if spec.nulls != "not_distinct" %}
where not ({{ nulls | join(" or ") }})
{%- endif %}
group by {{ keys | join(", ") }}
having count(distinct cast(row(copies.*) as text)) > 1
{%- endmacro %}
