with source as (

    select * from {{ source('breezeway', 'task_photos') }}

)

select * from source
