{{ dedup_removed_rows('stg_breezeway__reservation_guests', 'reservation_guests') }}
