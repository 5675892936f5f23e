{% macro dedup_rows_read(relation, spec) %}
    {#- What a model or test of the source reads its rows from: `relation`, or under keep: any
        the source table itself, whose system column ctid tells equal copies apart (a view in
        between has none). -#}
    {{ return(adapter.dispatch("dedup_rows_read", "dedup")(relation, spec)) }}
{% endmacro %}

{% macro default__dedup_rows_read(relation, spec) %}
    {%- if spec.any_copy -%}
        {{ return(api.Relation.create(database=spec.table.database, schema=spec.table.schema,
                                      identifier=spec.table.identifier)) }}
    {%- endif -%}
    {{ return(relation) }}
{% endmacro %}
