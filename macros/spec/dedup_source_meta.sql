{% macro dedup_source_meta(source_node) %}
    {{ return(source_node.config.get("meta", {}) or source_node.get("meta", {})) }}
{% endmacro %}
