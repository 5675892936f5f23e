{% macro dedup_spec_for_relation(relation) %}
    {#- Generic tests receive a relation, not a node: find the model or source behind it. -#}
    {{ return(adapter.dispatch("dedup_spec_for_relation", "dedup")(relation)) }}
{% endmacro %}

{% macro default__dedup_spec_for_relation(relation) %}
    {%- for node in graph.sources.values() -%}
        {%- if node.schema == relation.schema and node.identifier == relation.identifier -%}
            {{ return(dedup.dedup_spec_from_source(node)) }}
        {%- endif -%}
    {%- endfor -%}
    {%- for node in graph.nodes.values() -%}
        {%- if node.resource_type == "model" and node.schema == relation.schema and node.alias == relation.identifier -%}
            {{ return(dedup.dedup_spec_from_source(dedup.dedup_source_of(node))) }}
        {%- endif -%}
    {%- endfor -%}
    {{ exceptions.raise_compiler_error("dedup: no model or source is built as " ~ relation) }}
{% endmacro %}
