{{ dedup_removed_rows('stg_breezeway__task_photos', 'task_photos') }}
