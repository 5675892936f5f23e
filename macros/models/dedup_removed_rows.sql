{% macro dedup_removed_rows(upstream, kept) %}
    {#- The rows of the model `upstream` that the model `kept` does not keep, as a model. -#}
    {{ return(adapter.dispatch("dedup_removed_rows", "dedup")(upstream, kept)) }}
{% endmacro %}

{% macro default__dedup_removed_rows(upstream, kept) %}
    {%- set relation = ref(upstream) -%}
    {%- set kept_relation = ref(kept) -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif -%}
    {%- set spec = dedup.dedup_spec_for_model(upstream) -%}
    {%- set tiebreaker = adapter.quote(spec.tiebreaker) %}
{#- The anti-join is on the tie-breaker, unique and NOT NULL, never on the nullable natural key:
    NOT EXISTS on a key with NULLs would silently keep every NULL-key row. #}
with source_rows as (

    select * from {{ relation }}

),

kept_rows as (

    select {{ tiebreaker }} from {{ kept_relation }}

),

removed_rows as (

    select source_rows.*
    from source_rows
    where not exists (
        {{ dedup.dedup_exists_select() }} from kept_rows
        where kept_rows.{{ tiebreaker }} = source_rows.{{ tiebreaker }}
    )

)

select * from removed_rows
{%- endmacro %}
