{{ dedup_kept_rows('stg_breezeway__task_photos', 'int_task_photos_grouped_by_key') }}
