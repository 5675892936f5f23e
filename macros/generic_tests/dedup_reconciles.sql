{#
    Nothing vanishes and nothing is invented: every kept row is the one its key group chose,
    once, and every group's chosen row is kept, unless the ETL has deleted it from the source
    since the build read it (the swap replays that delete). With the tie-breaker unique in the
    source (dedup_tiebreaker_unique), the removed rows (dedup_removed_rows: the source rows
    whose tie-breaker is not kept) are then the rest: kept + removed = source.
    It holds on the build's own snapshot, whatever the ETL writes meanwhile: a row written
    since is a source row and a removed row alike, and a kept row deleted since, between the
    key groups and the kept rows or between those and this test, is a row the source no longer
    has. The kept rows and the groups are as many as the table's keys, so comparing them is
    cheap; the source is read by its tie-breaker only for a chosen row that is not kept, which
    is none when all is well. A kept row the ETL re-keyed since is kept under its new key by
    the swap's replay, not here. (Whether the build saw every row is for the swap to prove: it
    replays what was written since, row by row.) Fails with one row holding all the counts.
#}
{% test dedup_reconciles(model, source_rows, key_groups) %}
    {{ return(adapter.dispatch("test_dedup_reconciles", "dedup")(model, source_rows, key_groups)) }}
{% endtest %}

{% macro default__test_dedup_reconciles(model, source_rows, key_groups) %}
    {%- set spec = dedup.dedup_spec_for_relation(model) if execute else {"tiebreaker": "parsing"} -%}
    {%- if spec.any_copy -%}
        {{ return(dedup._dedup_copies_reconcile(model, dedup.dedup_rows_read(source_rows, spec), key_groups, spec)) }}
    {%- endif -%}
    {%- set tiebreaker = dedup.dedup_quote(spec.tiebreaker) %}

with kept_rows as (

    select {{ tiebreaker }} as tiebreaker, true as dedup_is_kept from {{ model }}

),

chosen as (

    select
        dedup_kept as tiebreaker,
        true as dedup_is_chosen
        {%- for column in spec.natural_key %},
        {{ dedup.dedup_quote(column) }}
        {%- endfor %}
        {%- for term in dedup.dedup_alternative_terms(spec) %},
        dedup_alternative_{{ loop.index }}
        {%- endfor %}
    from {{ key_groups }}

),

kept_count as (

    select count(*) as kept_rows, count(distinct tiebreaker) as distinct_kept_rows
    from kept_rows

),

{#- The kept rows and the chosen ones matched both ways in one join, not two: of 2 million
    rows each, two anti joins took 3.3 s and this one 2.3 s. What one side lacks is none
    when all is well. #}
unmatched as (

    select
        kept_rows.dedup_is_kept,
        chosen.*
    from kept_rows
    full outer join chosen on chosen.tiebreaker = kept_rows.tiebreaker
    where kept_rows.dedup_is_kept is null or chosen.dedup_is_chosen is null

),

not_chosen as (

    select count(*) as kept_rows_not_chosen
    from unmatched
    where dedup_is_chosen is null

),

chosen_not_kept as (

    select *
    from unmatched
    where dedup_is_kept is null

),

vanished as (

    {#- Chosen, not kept, and still in the source under the same key: lost by the build, not
        deleted or re-keyed since. #}
    select count(*) as chosen_rows_lost
    from {{ source_rows }} as source_rows
    where {{ dedup.dedup_in_subquery("source_rows." ~ tiebreaker, "select tiebreaker from chosen_not_kept") }}
        and exists (
            {{ dedup.dedup_exists_select() }} from chosen_not_kept
            where chosen_not_kept.tiebreaker = source_rows.{{ tiebreaker }}
                and {{ dedup.dedup_same_group(spec, "chosen_not_kept", "source_rows") }}
        )

),

counts as (

    select
        kept_count.kept_rows,
        kept_count.distinct_kept_rows,
        not_chosen.kept_rows_not_chosen,
        vanished.chosen_rows_lost
    from kept_count
    cross join not_chosen
    cross join vanished

)

select * from counts
where kept_rows <> distinct_kept_rows
    or kept_rows_not_chosen <> 0
    or chosen_rows_lost <> 0
{%- endmacro %}


{% macro _dedup_copies_reconcile(model, source_rows, key_groups, spec) %}
    {#- keep: any: kept rows are found by their key, since a copy's ctid is the source table's
        alone. Every kept row's key has a group, and every group whose chosen copy is still in
        the source under its key has a kept row. #}

with not_chosen as (

    select count(*) as kept_rows_not_chosen
    from {{ model }} as kept_rows
    where not exists (
        {{ dedup.dedup_exists_select() }} from {{ key_groups }} as key_groups
        where {{ dedup.dedup_same_group(spec, "key_groups", "kept_rows") }}
    )

),

vanished as (

    select count(*) as chosen_rows_lost
    from {{ key_groups }} as key_groups
    where exists (
        {{ dedup.dedup_exists_select() }} from {{ source_rows }} as source_rows
        where source_rows.ctid = key_groups.dedup_kept
            and {{ dedup.dedup_same_group(spec, "key_groups", "source_rows") }}
    )
    and not exists (
        {{ dedup.dedup_exists_select() }} from {{ model }} as kept_rows
        where {{ dedup.dedup_same_group(spec, "key_groups", "kept_rows") }}
    )

)

select *
from not_chosen
cross join vanished
where kept_rows_not_chosen <> 0 or chosen_rows_lost <> 0
{%- endmacro %}
