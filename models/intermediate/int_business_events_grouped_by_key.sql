{{ dedup_key_groups('stg_breezeway__business_events') }}
