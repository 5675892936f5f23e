{{ dedup_kept_rows('stg_breezeway__business_events', 'int_business_events_grouped_by_key') }}
