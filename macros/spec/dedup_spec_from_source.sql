{#
    The deduplication spec of a live table is declared once, on its source table:

        config:
          meta:
            dedup:
              natural_key: [property_pk, photo_id]
              keep: [{column: id, order: desc}]   # last entry: a unique, NOT NULL tie-breaker
              # or keep: any, where a key's copies are equal in every column (a link table
              # without a unique column): any copy stays, deduplicated in place
              nulls: not_distinct                # or distinct, forbidden, backfill
              # optional: where the natural key has a NULL, the rows' key instead (NULLs
              # equal), e.g. [reservation_pk, guest_email, guest_name] for guests without email
              alternative_key: [property_pk, photo_id, caption]
              # optional: rows of other tables that point at a removed duplicate are
              # re-pointed at the kept row of its key (repoint, the default), or the swap
              # refuses the table (refuse)
              references: repoint
              # optional: swap (a new table of the kept rows takes the live table's place),
              # in_place (the removed rows are archived and deleted from the live table), or
              # auto (the default), which `runner swap` decides from the duplicates' share
              strategy: auto

    Every model, test and the runner read it from there. These macros find it from any model
    downstream of the source, and stop compilation with a message naming what is wrong.
#}

{% macro dedup_spec_from_source(source_node) %}
    {{ return(adapter.dispatch("dedup_spec_from_source", "dedup")(source_node)) }}
{% endmacro %}

{% macro default__dedup_spec_from_source(source_node) %}
    {#- The same checks, in the same order and words, as the runner's parse_spec, which reads
        the manifest before any model is compiled: a test runs both on the same mistakes. -#}
    {%- set where = "dedup: source " ~ source_node.source_name ~ "." ~ source_node.name -%}
    {%- set spec = dedup.dedup_source_meta(source_node).get("dedup") -%}
    {%- if spec is not mapping -%}
        {{ exceptions.raise_compiler_error(where ~ " has no meta.dedup: declare natural_key, keep and nulls under config.meta.dedup") }}
    {%- endif -%}
    {%- set unknown = spec.keys() | reject("in", ["natural_key", "keep", "nulls", "alternative_key", "references", "strategy"]) | sort | list -%}
    {%- if unknown -%}
        {{ exceptions.raise_compiler_error(where ~ ": unknown meta.dedup keys " ~ tojson(unknown) ~ "; expected natural_key, keep, nulls, alternative_key, references, strategy") }}
    {%- endif -%}
    {%- set natural_key = spec.get("natural_key") -%}
    {%- if natural_key is string or natural_key is mapping or natural_key is not iterable
           or natural_key | length == 0 or natural_key | reject("string") | list | length > 0
           or "" in natural_key -%}
        {{ exceptions.raise_compiler_error(where ~ ": natural_key must be a non-empty list of column names, got " ~ tojson(natural_key)) }}
    {%- endif -%}
    {%- set keep = spec.get("keep") -%}
    {%- set any_copy = keep == "any" -%}
    {%- if any_copy -%}
        {%- set keep = [{"column": "ctid", "order": "asc"}] -%}
    {%- endif -%}
    {%- if keep is string or keep is mapping or keep is not iterable or keep | length == 0 -%}
        {{ exceptions.raise_compiler_error(where ~ ": keep must be a non-empty list of {column, order} ending in a unique tie-breaker, or any where a key's copies are equal in every column, got " ~ tojson(keep)) }}
    {%- endif -%}
    {%- for entry in keep -%}
        {%- if entry is not mapping or entry.get("column") is not string or entry.get("order") not in ["asc", "desc"] -%}
            {{ exceptions.raise_compiler_error(where ~ ": each keep entry needs column and order (asc or desc), got " ~ tojson(entry)) }}
        {%- endif -%}
    {%- endfor -%}
    {%- set nulls = spec.get("nulls", "not_distinct") -%}
    {%- if nulls not in ["not_distinct", "distinct", "forbidden", "backfill"] -%}
        {{ exceptions.raise_compiler_error(where ~ ": nulls must be one of not_distinct, distinct, forbidden, backfill, got " ~ tojson(nulls)) }}
    {%- endif -%}
    {%- set alternative_key = spec.get("alternative_key", []) -%}
    {%- if "alternative_key" in spec and (
           alternative_key is string or alternative_key is mapping or alternative_key is not iterable
           or alternative_key | reject("string") | list | length > 0 or "" in alternative_key
           or natural_key | reject("in", alternative_key) | list | length > 0
           or alternative_key | reject("in", natural_key) | list | length == 0) -%}
        {{ exceptions.raise_compiler_error(where ~ ": alternative_key must list every natural_key column and the columns that tell apart rows whose natural key has a NULL, got " ~ tojson(alternative_key)) }}
    {%- endif -%}
    {%- if alternative_key and nulls != "not_distinct" -%}
        {{ exceptions.raise_compiler_error(where ~ ": alternative_key makes NULLs in it equal: leave nulls out or set it to not_distinct, got " ~ tojson(nulls)) }}
    {%- endif -%}
    {%- set references = spec.get("references", "repoint") -%}
    {%- if references not in ["repoint", "refuse"] -%}
        {{ exceptions.raise_compiler_error(where ~ ": references must be one of repoint, refuse, got " ~ tojson(references)) }}
    {%- endif -%}
    {%- set strategy = spec.get("strategy", "auto") -%}
    {%- if strategy not in ["auto", "swap", "in_place"] -%}
        {{ exceptions.raise_compiler_error(where ~ ": strategy must be one of auto, swap, in_place, got " ~ tojson(strategy)) }}
    {%- endif -%}
    {%- if strategy == "in_place" and nulls == "backfill" -%}
        {{ exceptions.raise_compiler_error(where ~ ": strategy in_place keeps rows as they are, and nulls: backfill changes them: set strategy to swap or auto") }}
    {%- endif -%}
    {%- if any_copy and strategy == "swap" -%}
        {{ exceptions.raise_compiler_error(where ~ ": keep: any tells equal copies apart by their place in the table, which only in place keeps: set strategy to in_place or auto") }}
    {%- endif -%}
    {%- if any_copy and nulls == "backfill" -%}
        {{ exceptions.raise_compiler_error(where ~ ": keep: any deduplicates in place, which keeps rows as they are, and nulls: backfill changes them: set nulls to another policy") }}
    {%- endif -%}
    {{ return({
        "source": source_node.source_name ~ "." ~ source_node.name,
        "natural_key": natural_key,
        "keep": keep,
        "tiebreaker": keep[-1]["column"],
        "nulls": nulls,
        "alternative_key": alternative_key | unique | list,
        "told_apart_by": alternative_key | reject("in", natural_key) | unique | list,
        "references": references,
        "strategy": strategy,
        "any_copy": any_copy,
        "table": {"database": source_node.get("database"), "schema": source_node.get("schema"),
                  "identifier": source_node.get("identifier")},
    }) }}
{% endmacro %}
