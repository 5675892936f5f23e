{#
    Nothing vanishes and nothing is invented: kept = the number of natural keys (groups) the
    build found, and kept + removed = source rows. Both hold while the ETL keeps writing: the
    first compares two tables of the build, the second is one statement, so one snapshot, and
    a row written since the build is a removed row and a source row alike. (Whether the build
    saw every row is for the swap to prove: it replays what was written since, row by row.)
    Fails with one row holding all the counts.
#}
{% test dedup_reconciles(model, source_rows, removed_rows, key_groups) %}

with source_count as (

    select count(*) as n from {{ source_rows }}

),

kept_count as (

    select count(*) as n from {{ model }}

),

removed_count as (

    select count(*) as n from {{ removed_rows }}

),

group_counts as (

    select count(*) as groups from {{ key_groups }}

),

counts as (

    select
        source_count.n as source_rows,
        kept_count.n as kept_rows,
        removed_count.n as removed_rows,
        group_counts.groups as natural_keys
    from source_count
    cross join kept_count
    cross join removed_count
    cross join group_counts

)

select * from counts
where kept_rows + removed_rows <> source_rows
    or kept_rows <> natural_keys

{% endtest %}
