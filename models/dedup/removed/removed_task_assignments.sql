{{ dedup_removed_rows('stg_breezeway__task_assignments', 'task_assignments') }}
