{% macro dedup_key_groups_work_mem() %}
    {#- For a key-groups model's pre-hook (`model` is the model): a keep rule on the tie-breaker
        alone is a hash aggregate, which wants little memory (var dedup_work_mem says why); a
        lexicographic one sorts every row's narrow columns, which wants room to sort in memory. -#}
    {{ return(adapter.dispatch("dedup_key_groups_work_mem", "dedup")()) }}
{% endmacro %}

{% macro default__dedup_key_groups_work_mem() %}
    {%- if not execute -%}{{ return(var("dedup_work_mem")) }}{%- endif -%}
    {%- set spec = dedup.dedup_spec_from_source(dedup.dedup_source_of(model)) -%}
    {{ return(var("dedup_work_mem") if spec.keep | length == 1 else var("dedup_sort_work_mem")) }}
{% endmacro %}
