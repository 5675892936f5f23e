with source as (

    select * from {{ source('shop', 'order_lines') }}

)

select * from source
