{{ dedup_kept_rows('stg_breezeway__task_requirements', 'int_task_requirements_grouped_by_key') }}
