with source as (

    select * from {{ source('breezeway', 'task_requirements') }}

)

select * from source
