{{ config(alias='Order Lines') }}
{{ dedup.dedup_kept_rows('stg_shop__order_lines', 'int_order_lines_grouped_by_key') }}
