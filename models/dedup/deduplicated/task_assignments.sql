{{ dedup_kept_rows('stg_breezeway__task_assignments', 'int_task_assignments_grouped_by_key') }}
