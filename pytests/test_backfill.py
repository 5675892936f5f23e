"""nulls: backfill (seed 000, Step 2) through the swap: every NULL key becomes a fresh uuid,
writes captured meanwhile are backfilled too, and a rollback brings the NULLs back."""

from __future__ import annotations

from conftest import TEST_SCALE, Database

from runner import demo

EVENTS = demo.expected_counts(TEST_SCALE)["business_events"]


def test_the_swapped_table_has_no_null_key_and_keeps_every_null_key_event(
        fresh: Database) -> None:
    with fresh.connect() as conn:
        # Written between the build and the swap: the replay must backfill them as dbt did.
        conn.execute("insert into breezeway.business_events (request_id, event_type, ts)"
                     " values (null, 'late', now()), (null, 'late', now())")
        conn.execute("update breezeway.business_events set event_type = 'changed'"
                     " where id = (select min(id) from breezeway.business_events"
                     " where request_id is null)")
    result = fresh.runner("swap", "--select", "business_events")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        rows, null_keys, keys, late, changed = conn.execute(
            "select count(*), count(*) filter (where request_id is null),"
            " count(distinct request_id), count(*) filter (where event_type = 'late'),"
            " count(*) filter (where event_type = 'changed') from breezeway.business_events"
        ).fetchone()
        archive = conn.execute(
            "select archive_table from dedup_archive.swap_log"
            " where live_table = 'business_events'").fetchone()[0]
        archived_null_keys = conn.execute(
            f'select count(*) from dedup_archive."{archive}" where request_id is null'
        ).fetchone()[0]
        constraint = conn.execute(
            "select pg_get_constraintdef(oid) from pg_constraint where conrelid ="
            " 'breezeway.business_events'::regclass and contype = 'u'").fetchone()[0]
    assert (rows, null_keys, keys, late, changed) == (EVENTS.unique + 2, 0, EVENTS.unique + 2,
                                                      2, 1)
    # The original keeps its NULLs: the backfill is in the new table only.
    assert archived_null_keys == EVENTS.null_keys + 2
    assert constraint == "UNIQUE (request_id)"


def test_rollback_gives_back_the_nulls_the_swap_filled_and_keeps_later_writes(
        fresh: Database) -> None:
    result = fresh.runner("swap", "--select", "business_events")
    assert result.exit_code == 0, result.output
    with fresh.connect() as conn:
        archive = conn.execute(
            "select archive_table from dedup_archive.swap_log"
            " where live_table = 'business_events'").fetchone()[0]
        backfilled = [row[0] for row in conn.execute(
            f'select id from dedup_archive."{archive}" where request_id is null order by id')]
        # After the swap the ETL updates one backfilled event and gives another its real id.
        conn.execute("update breezeway.business_events set event_type = 'after swap'"
                     " where id = %s", (backfilled[0],))
        conn.execute("update breezeway.business_events set request_id ="
                     " '00000000-0000-0000-0000-000000000001' where id = %s", (backfilled[1],))
        backfilled_value = conn.execute(
            "select request_id from breezeway.business_events where id = %s",
            (backfilled[0],)).fetchone()[0]
    rolled_back = fresh.runner("rollback")
    assert rolled_back.exit_code == 0, rolled_back.output
    with fresh.connect() as conn:
        states = {row[0]: row[1:] for row in conn.execute(
            "select id, request_id::text, event_type from breezeway.business_events"
            " where id = any(%s)", (backfilled,))}
        rows, null_keys = conn.execute(
            "select count(*), count(*) filter (where request_id is null)"
            " from breezeway.business_events").fetchone()
    assert rows == EVENTS.total
    # Untouched since the swap: NULL again, as the original had it.
    assert null_keys == EVENTS.null_keys - 2
    assert all(states[i][0] is None for i in backfilled[2:])
    # The ETL's own writes since the swap are kept, the backfilled key they carried included.
    assert states[backfilled[0]] == (str(backfilled_value), "after swap")
    assert states[backfilled[1]][0] == "00000000-0000-0000-0000-000000000001"
