{% macro dedup_source_meta(source_node) %}
    {#- A source node's meta: under its config, or else at its top level. -#}
    {{ return(adapter.dispatch("dedup_source_meta", "dedup")(source_node)) }}
{% endmacro %}

{% macro default__dedup_source_meta(source_node) %}
    {{ return(source_node.config.get("meta", {}) or source_node.get("meta", {})) }}
{% endmacro %}
