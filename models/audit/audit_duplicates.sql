{{ dedup_audit([
    'int_property_photos_grouped_by_key',
    'int_task_requirements_grouped_by_key',
    'int_reservation_guests_grouped_by_key',
    'int_task_assignments_grouped_by_key',
    'int_task_photos_grouped_by_key',
    'int_task_tags_grouped_by_key',
    'int_business_events_grouped_by_key',
]) }}
