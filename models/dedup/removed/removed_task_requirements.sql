{{ dedup_removed_rows('stg_breezeway__task_requirements', 'task_requirements') }}
