{% macro dedup_live_audit() %}
    {#- The audit of dedup_audit, computed now from the live tables: every source that declares
        meta.dedup, found in the graph when the model runs. So dbt records no dependency on
        those sources, on purpose: in `dbt build` a failing test on a source skips what reads
        it, and the numbers must be recorded most of all when a uniqueness test fails. -#}
    {{ return(adapter.dispatch("dedup_live_audit", "dedup")()) }}
{% endmacro %}

{% macro default__dedup_live_audit() %}
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
