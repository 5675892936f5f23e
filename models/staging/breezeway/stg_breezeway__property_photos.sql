with source as (

    select * from {{ source('breezeway', 'property_photos') }}

)

select * from source
