{{ dedup.dedup_key_groups('stg_shop__order_lines') }}
