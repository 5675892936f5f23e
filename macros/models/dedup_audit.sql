{% macro dedup_audit(key_groups_models) %}
    {#- The seed's table 2.1 per table, from the key groups: no second scan of any source. -#}
    {{ return(adapter.dispatch("dedup_audit", "dedup")(key_groups_models)) }}
{% endmacro %}

{% macro default__dedup_audit(key_groups_models) %}
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
