{{ dedup.dedup_removed_rows('stg_shop__order_lines', 'order_lines') }}
