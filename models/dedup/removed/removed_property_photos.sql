{{ dedup_removed_rows('stg_breezeway__property_photos', 'property_photos') }}
