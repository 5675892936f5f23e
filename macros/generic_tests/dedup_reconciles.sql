{#
    Nothing vanishes and nothing is invented: kept + removed = source rows, kept = the number of
    natural keys (groups) in the source, and the groups account for every source row.
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

    select
        count(*) as groups,
        coalesce(sum(dedup_rows), 0) as grouped_rows
    from {{ key_groups }}

),

counts as (

    select
        source_count.n as source_rows,
        kept_count.n as kept_rows,
        removed_count.n as removed_rows,
        group_counts.groups as natural_keys,
        group_counts.grouped_rows
    from source_count
    cross join kept_count
    cross join removed_count
    cross join group_counts

)

select * from counts
where kept_rows + removed_rows <> source_rows
    or kept_rows <> natural_keys
    or grouped_rows <> source_rows

{% endtest %}
