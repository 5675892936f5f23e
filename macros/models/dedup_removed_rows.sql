{% macro dedup_removed_rows(upstream, kept) %}
    {#- The rows of the model `upstream` that the model `kept` does not keep, as a model. -#}
    {{ return(adapter.dispatch("dedup_removed_rows", "dedup")(upstream, kept)) }}
{% endmacro %}

{% macro default__dedup_removed_rows(upstream, kept) %}
    {%- set relation = ref(upstream) -%}
    {%- set kept_relation = ref(kept) -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif -%}
    {%- set spec = dedup.dedup_spec_for_model(upstream) -%}
    {%- if spec.any_copy -%}
        {{ return(dedup._dedup_removed_copies(dedup.dedup_rows_read(relation, spec), spec)) }}
    {%- endif -%}
    {%- set tiebreaker = dedup.dedup_quote(spec.tiebreaker) %}
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


{% macro _dedup_removed_copies(relation, spec) %}
    {#- keep: any: a key's copies are equal, so the removed ones are every copy but the first
        in the table's order, the one the key groups chose. -#}
    {%- set partition = [dedup.dedup_columns(spec.natural_key)] + dedup.dedup_alternative_terms(spec) -%}
    {%- if spec.nulls != "not_distinct" -%}
        {%- do partition.append("case when " ~ dedup.dedup_any_null(spec.natural_key) ~ " then ctid end") -%}
    {%- endif -%}
    {%- set columns = [] -%}
    {%- for column in adapter.get_columns_in_relation(relation) -%}
        {%- do columns.append(dedup.dedup_quote(column.name)) -%}
    {%- endfor %}
with numbered_copies as (

    select
        *,
        row_number() over (partition by {{ partition | join(", ") }} order by ctid) as dedup_copy
    from {{ relation }}

)

select
    {{ columns | join(",\n    ") }}
from numbered_copies
where dedup_copy > 1
{%- endmacro %}
