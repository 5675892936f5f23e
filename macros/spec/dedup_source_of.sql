{% macro dedup_source_of(node) %}
    {#- The one source a model reads, however many models lie between them. -#}
    {{ return(adapter.dispatch("dedup_source_of", "dedup")(node)) }}
{% endmacro %}

{% macro default__dedup_source_of(node) %}
    {%- set found = [] -%}
    {%- set pending = node.depends_on.nodes | list -%}
    {%- for _ in range(1000) if pending -%}
        {%- set unique_id = pending.pop() -%}
        {%- if unique_id in graph.sources and unique_id not in found -%}
            {%- do found.append(unique_id) -%}
        {%- elif unique_id in graph.nodes -%}
            {%- do pending.extend(graph.nodes[unique_id].depends_on.nodes) -%}
        {%- endif -%}
    {%- endfor -%}
    {%- if found | length != 1 -%}
        {{ exceptions.raise_compiler_error("dedup: model " ~ node.name ~ " must read exactly one source table, found " ~ found) }}
    {%- endif -%}
    {{ return(graph.sources[found[0]]) }}
{% endmacro %}
