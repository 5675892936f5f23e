{{ dedup_key_groups('stg_breezeway__reservation_guests') }}
