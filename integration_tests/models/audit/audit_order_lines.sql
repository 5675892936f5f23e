{{ dedup.dedup_audit(['int_order_lines_grouped_by_key']) }}
