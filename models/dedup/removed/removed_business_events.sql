{{ dedup_removed_rows('stg_breezeway__business_events', 'business_events') }}
