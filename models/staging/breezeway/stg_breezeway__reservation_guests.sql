with source as (

    select * from {{ source('breezeway', 'reservation_guests') }}

)

select * from source
