{{ dedup_live_audit() }}
