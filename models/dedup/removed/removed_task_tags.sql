{{ dedup_removed_rows('stg_breezeway__task_tags', 'task_tags') }}
