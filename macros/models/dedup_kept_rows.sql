{#
    The second step of deduplication (dedup_key_groups says why there are two): the rows whose
    tie-breakers the key groups chose, fetched by those alone.
#}

{% macro dedup_kept_rows(upstream, key_groups) %}
    {#- The rows of the model `upstream` that the model `key_groups` chose, as a model. -#}
    {{ return(adapter.dispatch("dedup_kept_rows", "dedup")(upstream, key_groups)) }}
{% endmacro %}

{% macro default__dedup_kept_rows(upstream, key_groups) %}
    {%- set relation = ref(upstream) -%}
    {%- set groups = ref(key_groups) -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif -%}
    {%- set spec = dedup.dedup_spec_for_model(upstream) -%}
    {%- set relation = dedup.dedup_rows_read(relation, spec) -%}
    {%- set tiebreaker = dedup.dedup_quote(spec.tiebreaker) %}
{#- The source is read under its own name, not through a CTE, so that its system column ctid,
    the tie-breaker of keep: any, is there to read. #}
with kept_ids as (

    select dedup_kept from {{ groups }}

),

kept_rows as (

    {%- if spec.nulls == "backfill" %}
    select
        {%- for column in adapter.get_columns_in_relation(relation) %}
        {% if column.name in spec.natural_key -%}
        {{ dedup.dedup_backfilled_column(column, spec) }} as {{ dedup.dedup_quote(column.name) }}
        {%- else -%}
        source_rows.{{ dedup.dedup_quote(column.name) }}
        {%- endif %}{{ "," if not loop.last else "" }}
        {%- endfor %}
    {%- else %}
    select source_rows.*
    {%- endif %}
    from {{ relation }} as source_rows
    {#- A table fetches its kept rows by their tie-breakers; a view (in place, where most rows
        are kept) is read whole by the tests, and a hash join with the key groups over one
        scan of the source reads it fastest. #}
    where {% if config.get("materialized") != "view" -%}
        {{ dedup.dedup_in_subquery("source_rows." ~ tiebreaker, "select kept_ids.dedup_kept from kept_ids") }}
        {#- Still under the key its group has: a row the ETL re-keyed since the key groups
            were read belongs to another key now, which the swap works out as it replays. #}
        and {% endif %}exists (
            {{ dedup.dedup_exists_select() }} from {{ groups }} as key_groups
            where key_groups.dedup_kept = source_rows.{{ tiebreaker }}
                and {{ dedup.dedup_same_group(spec, "key_groups", "source_rows") }}
        )

)

select * from kept_rows
{%- endmacro %}
