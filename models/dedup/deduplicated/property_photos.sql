{{ dedup_kept_rows('stg_breezeway__property_photos', 'int_property_photos_grouped_by_key') }}
