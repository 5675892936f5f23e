with source as (

    select * from {{ source('breezeway', 'task_assignments') }}

)

select * from source
