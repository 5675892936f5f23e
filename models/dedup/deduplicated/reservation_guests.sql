{{ dedup_kept_rows('stg_breezeway__reservation_guests', 'int_reservation_guests_grouped_by_key') }}
