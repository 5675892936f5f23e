{% macro dedup_backfilled_column(column, spec) %}
    {#- Under nulls: backfill a NULL in the natural key becomes a fresh uuid, of the column's own
        type so that the deduplicated table keeps the live table's columns exactly. -#}
    {{ return(adapter.dispatch("dedup_backfilled_column", "dedup")(column, spec)) }}
{% endmacro %}

{% macro default__dedup_backfilled_column(column, spec) %}
    {#- No portable SQL makes a fresh uuid, nor tells which column types can hold one. -#}
    {{ exceptions.raise_compiler_error("dedup_backfilled_column: source " ~ spec.source ~ ": nulls: backfill is supported on the postgres adapter only (it fills NULL keys with gen_random_uuid()), not on " ~ adapter.type() ~ "; use nulls: distinct or forbidden") }}
{% endmacro %}

{% macro postgres__dedup_backfilled_column(column, spec) %}
    {%- set data_type = column.data_type | lower -%}
    {%- set fits_uuid = data_type in ["uuid", "text", "character varying"]
        or (data_type.startswith("character varying(") and column.char_size is not none and column.char_size >= 36) -%}
    {%- if not fits_uuid -%}
        {{ exceptions.raise_compiler_error("dedup: source " ~ spec.source ~ ": nulls: backfill fills NULL keys with gen_random_uuid(), but natural key column " ~ column.name ~ " is " ~ column.data_type ~ ", which cannot hold one; use nulls: distinct or forbidden") }}
    {%- endif -%}
    {{ return("coalesce(" ~ dedup.dedup_quote(column.name) ~ ", cast(gen_random_uuid() as " ~ column.data_type ~ "))") }}
{% endmacro %}
