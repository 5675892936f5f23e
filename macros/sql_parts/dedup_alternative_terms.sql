{% macro dedup_alternative_terms(spec, prefix=none) %}
    {#- What the alternative key adds to a row's key: each of its other columns where the
        natural key has a NULL, and NULL where it has none, so that grouping by the natural
        key and these, NULLs equal, groups by whichever key the row has. Optionally qualified. -#}
    {{ return(adapter.dispatch("dedup_alternative_terms", "dedup")(spec, prefix)) }}
{% endmacro %}

{% macro default__dedup_alternative_terms(spec, prefix) %}
    {%- set qualifier = prefix ~ "." if prefix else "" -%}
    {%- set nulls = [] -%}
    {%- for column in spec.natural_key -%}
        {%- do nulls.append(qualifier ~ dedup.dedup_quote(column) ~ " is null") -%}
    {%- endfor -%}
    {%- set terms = [] -%}
    {%- for column in spec.get("told_apart_by", []) -%}
        {%- do terms.append("case when " ~ nulls | join(" or ") ~ " then " ~ qualifier ~ dedup.dedup_quote(column) ~ " end") -%}
    {%- endfor -%}
    {{ return(terms) }}
{% endmacro %}

{% macro dedup_same_group(spec, groups, rows) %}
    {#- The key group `groups` (a row of key groups) is the one of the source row `rows`:
        the same natural key, and where it has a NULL the same alternative key. -#}
    {{ return(adapter.dispatch("dedup_same_group", "dedup")(spec, groups, rows)) }}
{% endmacro %}

{% macro default__dedup_same_group(spec, groups, rows) %}
    {%- set checks = [dedup.dedup_same_key(spec.natural_key, groups, rows)] -%}
    {%- for term in dedup.dedup_alternative_terms(spec, rows) -%}
        {%- do checks.append(groups ~ ".dedup_alternative_" ~ loop.index ~ " is not distinct from " ~ term) -%}
    {%- endfor -%}
    {{ return(checks | join(" and ")) }}
{% endmacro %}
