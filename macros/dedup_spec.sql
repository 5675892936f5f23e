{#
    The deduplication spec of a live table is declared once, on its source table:

        config:
          meta:
            dedup:
              natural_key: [property_pk, photo_id]
              keep: [{column: id, order: desc}]   # last entry: a unique, NOT NULL tie-breaker
              nulls: not_distinct                # or distinct, forbidden, backfill

    Every model, test and the runner read it from there. These macros find it from any model
    downstream of the source, and stop compilation with a message naming what is wrong.
#}

{% macro dedup_spec_from_source(source_node) %}
    {%- set where = "dedup: source " ~ source_node.source_name ~ "." ~ source_node.name -%}
    {%- set spec = dedup.dedup_source_meta(source_node).get("dedup") -%}
    {%- if spec is none -%}
        {{ exceptions.raise_compiler_error(where ~ " has no meta.dedup: declare natural_key, keep and nulls under config.meta.dedup") }}
    {%- endif -%}
    {%- set natural_key = spec.get("natural_key") -%}
    {%- if natural_key is string or natural_key is none or natural_key | length == 0 -%}
        {{ exceptions.raise_compiler_error(where ~ ": natural_key must be a non-empty list of column names, got " ~ natural_key) }}
    {%- endif -%}
    {%- set keep = spec.get("keep") -%}
    {%- if keep is string or keep is none or keep | length == 0 -%}
        {{ exceptions.raise_compiler_error(where ~ ": keep must be a non-empty list of {column, order} ending in a unique tie-breaker, got " ~ keep) }}
    {%- endif -%}
    {%- for entry in keep -%}
        {%- if entry is not mapping or entry.get("column") is none or entry.get("order") not in ["asc", "desc"] -%}
            {{ exceptions.raise_compiler_error(where ~ ": each keep entry needs column and order (asc or desc), got " ~ entry) }}
        {%- endif -%}
    {%- endfor -%}
    {%- set nulls = spec.get("nulls", "not_distinct") -%}
    {%- if nulls not in ["not_distinct", "distinct", "forbidden", "backfill"] -%}
        {{ exceptions.raise_compiler_error(where ~ ": nulls must be not_distinct, distinct, forbidden or backfill, got " ~ nulls) }}
    {%- endif -%}
    {%- set unknown = spec.keys() | reject("in", ["natural_key", "keep", "nulls"]) | list -%}
    {%- if unknown -%}
        {{ exceptions.raise_compiler_error(where ~ ": unknown meta.dedup keys " ~ unknown ~ "; expected natural_key, keep, nulls") }}
    {%- endif -%}
    {{ return({
        "source": source_node.source_name ~ "." ~ source_node.name,
        "natural_key": natural_key,
        "keep": keep,
        "tiebreaker": keep[-1]["column"],
        "nulls": nulls,
    }) }}
{% endmacro %}


{% macro dedup_source_meta(source_node) %}
    {{ return(source_node.config.get("meta", {}) or source_node.get("meta", {})) }}
{% endmacro %}


{% macro dedup_source_of(node) %}
    {#- The one source a model reads, however many models lie between them. -#}
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


{% macro dedup_spec_for_model(model_name) %}
    {%- set unique_id = "model." ~ project_name ~ "." ~ model_name -%}
    {%- if unique_id not in graph.nodes -%}
        {{ exceptions.raise_compiler_error("dedup: no model named " ~ model_name) }}
    {%- endif -%}
    {{ return(dedup.dedup_spec_from_source(dedup.dedup_source_of(graph.nodes[unique_id]))) }}
{% endmacro %}


{% macro dedup_spec_for_relation(relation) %}
    {#- Generic tests receive a relation, not a node: find the model or source behind it. -#}
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


{% macro dedup_columns(columns, prefix=none) %}
    {#- A comma-separated list of quoted column names, optionally qualified. -#}
    {%- set quoted = [] -%}
    {%- for column in columns -%}
        {%- do quoted.append((prefix ~ "." if prefix else "") ~ adapter.quote(column)) -%}
    {%- endfor -%}
    {{ return(quoted | join(", ")) }}
{% endmacro %}


{% macro dedup_any_null(columns) %}
    {%- set checks = [] -%}
    {%- for column in columns -%}
        {%- do checks.append(adapter.quote(column) ~ " is null") -%}
    {%- endfor -%}
    {{ return("(" ~ checks | join(" or ") ~ ")") }}
{% endmacro %}


{% macro dedup_same_key(columns, left, right) %}
    {#- The rows `left` and `right` have the same key, a NULL equal to a NULL: the same row's
        key as it was and as it is. -#}
    {%- set checks = [] -%}
    {%- for column in columns -%}
        {%- do checks.append(left ~ "." ~ adapter.quote(column) ~ " is not distinct from " ~ right ~ "." ~ adapter.quote(column)) -%}
    {%- endfor -%}
    {{ return(checks | join(" and ")) }}
{% endmacro %}


{% macro dedup_string_literal(value) %}
    {{ return("'" ~ (value | string | replace("'", "''")) ~ "'") }}
{% endmacro %}


{% macro dedup_backfilled_column(column, spec) %}
    {#- Under nulls: backfill a NULL in the natural key becomes a fresh uuid, of the column's own
        type so that the deduplicated table keeps the live table's columns exactly. -#}
    {%- set data_type = column.data_type | lower -%}
    {%- set fits_uuid = data_type in ["uuid", "text", "character varying"]
        or (data_type.startswith("character varying(") and column.char_size is not none and column.char_size >= 36) -%}
    {%- if not fits_uuid -%}
        {{ exceptions.raise_compiler_error("dedup: source " ~ spec.source ~ ": nulls: backfill fills NULL keys with gen_random_uuid(), but natural key column " ~ column.name ~ " is " ~ column.data_type ~ ", which cannot hold one; use nulls: distinct or forbidden") }}
    {%- endif -%}
    {{ return("coalesce(" ~ adapter.quote(column.name) ~ ", cast(gen_random_uuid() as " ~ column.data_type ~ "))") }}
{% endmacro %}
