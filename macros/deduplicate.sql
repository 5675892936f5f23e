{#
    Deduplication in two steps, so the wide rows are never sorted:
    1. dedup_key_groups: one pass over the narrow key and keep columns finds, per natural key,
       the tie-breaker of the row to keep and how many rows share the key;
    2. dedup_kept_rows: fetches only those rows, by their tie-breaker (an index lookup each).
    Sorting the full rows (DISTINCT ON, row_number()) of a 10M-row, 9 GB table took 24 s on
    these machines; this takes about one sequential scan.
#}

{% macro dedup_key_groups(upstream) %}
    {{ return(adapter.dispatch("dedup_key_groups", "dedup")(upstream)) }}
{% endmacro %}

{% macro postgres__dedup_key_groups(upstream) %}
    {#- Also records the snapshot the scan saw, so that `runner swap` can prove its change
        capture started before it: no write between the build and the swap goes unseen. -#}
    {{ return(dedup.default__dedup_key_groups(upstream, snapshot="pg_current_snapshot()")) }}
{% endmacro %}

{% macro default__dedup_key_groups(upstream, snapshot=none) %}
    {%- set relation = ref(upstream) -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif %}

with {{ dedup.dedup_key_groups_ctes(relation, dedup.dedup_spec_for_model(upstream)) }}

select
    *{%- if snapshot %},
    {{ snapshot }} as dedup_snapshot
    {%- endif %}
from key_groups
{%- endmacro %}


{% macro dedup_key_groups_work_mem() %}
    {#- For a key-groups model's pre-hook (`model` is the model): a keep rule on the tie-breaker
        alone is a hash aggregate, which wants little memory (var dedup_work_mem says why); a
        lexicographic one sorts every row's narrow columns, which wants room to sort in memory. -#}
    {%- if not execute -%}{{ return(var("dedup_work_mem")) }}{%- endif -%}
    {%- set spec = dedup.dedup_spec_from_source(dedup.dedup_source_of(model)) -%}
    {{ return(var("dedup_work_mem") if spec.keep | length == 1 else var("dedup_sort_work_mem")) }}
{% endmacro %}


{% macro dedup_key_groups_ctes(relation, spec, prefix="") %}
    {#- Two CTEs, <prefix>source_rows and <prefix>key_groups: the key groups of any relation
        with the spec's columns. The prefix lets one query hold those of several tables. -#}
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


{% macro dedup_kept_rows(upstream, key_groups) %}
    {{ return(adapter.dispatch("dedup_kept_rows", "dedup")(upstream, key_groups)) }}
{% endmacro %}

{% macro postgres__dedup_kept_rows(upstream, key_groups) %}
    {#- The kept tie-breakers as one array: PostgreSQL then fetches the rows with a bitmap heap
        scan or an index scan over the sorted values, in the table's physical order, instead of
        one random read per row in the order a hash join happens to produce them. -#}
    {{ return(dedup.default__dedup_kept_rows(upstream, key_groups, kept_as_array=true)) }}
{% endmacro %}

{% macro default__dedup_kept_rows(upstream, key_groups, kept_as_array=false) %}
    {%- set relation = ref(upstream) -%}
    {%- set groups = ref(key_groups) -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif -%}
    {%- set spec = dedup.dedup_spec_for_model(upstream) -%}
    {%- set tiebreaker = adapter.quote(spec.tiebreaker) %}

with source_rows as (

    select * from {{ relation }}

),

kept_ids as (

    select dedup_kept from {{ groups }}

),

kept_rows as (

    {%- if spec.nulls == "backfill" %}
    select
        {%- for column in adapter.get_columns_in_relation(relation) %}
        {% if column.name in spec.natural_key -%}
        {{ dedup.dedup_backfilled_column(column, spec) }} as {{ adapter.quote(column.name) }}
        {%- else -%}
        source_rows.{{ adapter.quote(column.name) }}
        {%- endif %}{{ "," if not loop.last else "" }}
        {%- endfor %}
    {%- else %}
    select source_rows.*
    {%- endif %}
    from source_rows
    {%- if kept_as_array %}
    where source_rows.{{ tiebreaker }} = any(array(select kept_ids.dedup_kept from kept_ids))
    {%- else %}
    where source_rows.{{ tiebreaker }} in (select kept_ids.dedup_kept from kept_ids)
    {%- endif %}
        {#- Still under the key its group has: a row the ETL re-keyed since the key groups
            were read belongs to another key now, which the swap works out as it replays. #}
        and exists (
            select from {{ groups }} as key_groups
            where key_groups.dedup_kept = source_rows.{{ tiebreaker }}
                and {{ dedup.dedup_same_key(spec.natural_key, "key_groups", "source_rows") }}
        )

)

select * from kept_rows
{%- endmacro %}


{% macro dedup_removed_rows(upstream, kept) %}
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
        select from kept_rows
        where kept_rows.{{ tiebreaker }} = source_rows.{{ tiebreaker }}
    )

)

select * from removed_rows
{%- endmacro %}


{% macro dedup_audit(key_groups_models) %}
    {{ return(adapter.dispatch("dedup_audit", "dedup")(key_groups_models)) }}
{% endmacro %}

{% macro default__dedup_audit(key_groups_models) %}
    {#- The seed's table 2.1 per table, from the key groups: no second scan of any source. -#}
    {%- set relations = [] -%}
    {%- for name in key_groups_models -%}
        {%- do relations.append(ref(name)) -%}
    {%- endfor -%}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif -%}
    {%- set tables = [] -%}
    {%- for name in key_groups_models -%}
        {%- do tables.append({
            "name": name,
            "spec": dedup.dedup_spec_for_model(name),
            "key_groups": relations[loop.index0],
        }) -%}
    {%- endfor -%}
    {{ dedup.dedup_audit_report(tables) }}
{%- endmacro %}


{% macro dedup_live_audit() %}
    {{ return(adapter.dispatch("dedup_live_audit", "dedup")()) }}
{% endmacro %}

{% macro default__dedup_live_audit() %}
    {#- The same table, computed now from the live tables: every source that declares
        meta.dedup, found in the graph when the model runs. So dbt records no dependency on
        those sources, on purpose: in `dbt build` a failing test on a source skips what reads
        it, and the numbers must be recorded most of all when a uniqueness test fails. -#}
    {%- if not execute -%}{{ return("select 1 as parsing") }}{%- endif -%}
    {%- set tables = [] -%}
    {%- set key_groups_ctes = [] -%}
    {%- for node in graph.sources.values() | sort(attribute="unique_id") -%}
        {%- if dedup.dedup_source_meta(node).get("dedup") is not none -%}
            {%- set spec = dedup.dedup_spec_from_source(node) -%}
            {%- set name = "table_" ~ (tables | length + 1) -%}
            {%- do key_groups_ctes.append(dedup.dedup_key_groups_ctes(
                source(node.source_name, node.name), spec, prefix=name ~ "_"
            )) -%}
            {%- do tables.append({"name": name, "spec": spec, "key_groups": name ~ "_key_groups"}) -%}
        {%- endif -%}
    {%- endfor -%}
    {%- if not tables -%}
        {{ exceptions.raise_compiler_error("dedup_live_audit: no source declares config.meta.dedup") }}
    {%- endif -%}
    {{ dedup.dedup_audit_report(tables, key_groups_ctes) }}
{%- endmacro %}


{% macro dedup_audit_report(tables, key_groups_ctes=[]) %}
    {#- One row per table from its key groups (one row per natural key, with dedup_rows):
        tables is a list of {name, spec, key_groups}, key_groups a relation or one of the
        key_groups_ctes, which come first. -#}
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
        coalesce(sum(dedup_rows) filter (where {{ dedup.dedup_any_null(table.spec.natural_key) }}), 0)
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
