{{ dedup_key_groups('stg_breezeway__task_photos') }}
