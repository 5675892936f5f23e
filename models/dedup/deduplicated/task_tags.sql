{{ dedup_kept_rows('stg_breezeway__task_tags', 'int_task_tags_grouped_by_key') }}
