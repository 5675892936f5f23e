{#
    Deduplication in two steps, so the wide rows are never sorted:
    1. dedup_key_groups: one pass over the narrow key and keep columns finds, per natural key,
       the tie-breaker of the row to keep and how many rows share the key;
    2. dedup_kept_rows: fetches only those rows, by their tie-breaker (an index lookup each).
    Sorting the full rows (DISTINCT ON, row_number()) of a 10M-row, 9 GB table took 24 s on
    these machines; this takes about one sequential scan.
#}

{% macro dedup_key_groups(upstream) %}
    {#- The key groups of the model `upstream` (see dedup_key_groups_ctes), as a model. -#}
    {{ return(adapter.dispatch("dedup_key_groups", "dedup")(upstream)) }}
{% endmacro %}

{% macro default__dedup_key_groups(upstream) %}
    {%- set relation = ref(upstream) -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif %}

{%- set spec = dedup.dedup_spec_for_model(upstream) %}
with {{ dedup.dedup_key_groups_ctes(dedup.dedup_rows_read(relation, spec), spec) }}

select
    *
from key_groups
{%- endmacro %}

{% macro postgres__dedup_key_groups(upstream) %}
    {#- Also records the snapshot the scan saw, so that `runner swap` can prove its change
        capture started before it: no write between the build and the swap goes unseen. -#}
    {%- set relation = ref(upstream) -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif %}

{%- set spec = dedup.dedup_spec_for_model(upstream) %}
with {{ dedup.dedup_key_groups_ctes(dedup.dedup_rows_read(relation, spec), spec) }}

select
    *,
    pg_current_snapshot() as dedup_snapshot
from key_groups
{%- endmacro %}
