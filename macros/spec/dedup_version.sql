{#
    The version of this dbt package, which is the runner's own (runner/__init__.py): the
    runner reads it from dbt's manifest and refuses artifacts built by another version.
#}

{% macro dedup_version() %}
    {{ return("0.1.0") }}
{% endmacro %}
