{{ dedup_key_groups('stg_breezeway__property_photos') }}
