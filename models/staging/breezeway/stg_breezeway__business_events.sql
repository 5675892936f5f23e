with source as (

    select * from {{ source('breezeway', 'business_events') }}

)

select * from source
