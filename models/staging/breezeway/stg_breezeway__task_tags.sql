with source as (

    select * from {{ source('breezeway', 'task_tags') }}

)

select * from source
