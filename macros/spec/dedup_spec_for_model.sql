{% macro dedup_spec_for_model(model_name) %}
    {#- The spec of the one source that a model of the root project reads. -#}
    {{ return(adapter.dispatch("dedup_spec_for_model", "dedup")(model_name)) }}
{% endmacro %}

{% macro default__dedup_spec_for_model(model_name) %}
    {%- set unique_id = "model." ~ project_name ~ "." ~ model_name -%}
    {%- if unique_id not in graph.nodes -%}
        {{ exceptions.raise_compiler_error("dedup: no model named " ~ model_name) }}
    {%- endif -%}
    {{ return(dedup.dedup_spec_from_source(dedup.dedup_source_of(graph.nodes[unique_id]))) }}
{% endmacro %}
